"""One process of tests/test_data_train.py::test_two_processes_each_read_half (started
directly for 1 process, or by scripts/launch.py for 2): build the Run over a prepared
dataset, count the windows this process reads per batch, and write the assembled global
batches (allgathered) to OUT_{process}.json."""
import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxpar.train.__main__ import _init_distributed

ROOT = Path(__file__).resolve().parent.parent


def main(data: str, out: str) -> None:
    _init_distributed(False)
    from jaxpar.train.config import load_config
    from jaxpar.train.loop import Run

    cfg = load_config(ROOT / "configs/base.yaml", [
        f"data.path={data}", f"train.run_dir={out}_run", "train.batch_size=8",
        "train.seq_len=32", "model.layers=1", "model.embed=32", "model.heads=4",
        "model.kv_heads=2", "model.mlp=64", "mesh.data=2", "mesh.seq=2", "mesh.tensor=2",
        "attention.impl=ring", "eval.batches=2"])
    run = Run.create(cfg)
    reads, batches = set(), []
    for step in (1, 2, 9):
        before = run.data.reads
        b = run.batch(step)
        reads.add(run.data.reads - before)
        batches.append({k: np.asarray(multihost_utils.process_allgather(v, tiled=True)).tolist()
                        for k, v in b.items()})
    before = run.data.reads
    run.eval_batches()
    assert len(reads) == 1, reads
    Path(f"{out}_{jax.process_index()}.json").write_text(json.dumps({
        "reads_per_batch": reads.pop(), "eval_reads": run.data.reads - before,
        "batches": batches}))


if __name__ == "__main__":
    main(*sys.argv[1:])
