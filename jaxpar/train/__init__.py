"""Config-driven training runs: `python -m jaxpar.train CONFIG [section.key=value ...]`.

    config.py      typed frozen dataclasses, YAML `base:` inheritance, overrides, validation
    model.py       the built-in decoder or a user's Flax module (`model.module=pkg.mod:factory`)
    loop.py        sharded state, the compiled train/eval steps (DiLoCo included), sampling
    checkpoint.py  orbax: save every k steps, keep n, resume from the newest
    metrics.py     metrics.jsonl, TensorBoard when installed, progress bar
    run.py         train(cfg): the loop from an empty or existing run folder to a summary
"""
from jaxpar.train.config import Config, ConfigError, load_config
from jaxpar.train.checks import validate
from jaxpar.train.loop import Run, TrainState, cross_entropy, sample
from jaxpar.train.run import train

__all__ = ["Config", "ConfigError", "load_config", "validate", "Run", "TrainState",
           "cross_entropy", "sample", "train"]
