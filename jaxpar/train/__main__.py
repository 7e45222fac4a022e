"""`python -m jaxpar.train CONFIG.yaml [section.key=value ...]` (also `jaxpar-train`).

A bad config is one line on stderr naming the key and what would be valid, exit code 2,
and nothing is compiled. Multi-process: `scripts/launch.py` sets JAXPAR_COORDINATOR,
JAXPAR_NUM_PROCESSES and JAXPAR_PROCESS_ID; on a cluster pass `--distributed` and
`jax.distributed.initialize()` reads the cluster's own environment.
"""
from __future__ import annotations

import argparse
import os
import sys

ISLAND_EXIT_CODE = 5  # an IslandError after the join (launch.py --restarts restarts it)


def _init_distributed(cluster: bool) -> None:
    import jax

    if "JAXPAR_COORDINATOR" in os.environ:
        # CPU collectives across processes (affects only the CPU backend); set before the
        # backend starts, so without asking which backend this is
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ["JAXPAR_COORDINATOR"],
                                   num_processes=int(os.environ["JAXPAR_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAXPAR_PROCESS_ID"]))
    elif cluster:
        jax.distributed.initialize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jaxpar-train", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="YAML config (may name `base:`)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.layers=4")
    ap.add_argument("--distributed", action="store_true",
                    help="call jax.distributed.initialize() (cluster environments)")
    args = ap.parse_args(argv)

    from jaxpar.train.config import ConfigError, load_config
    from jaxpar.train.checks import validate

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _init_distributed(args.distributed)
    import jax

    try:
        validate(cfg, jax.device_count())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from jaxpar.train.faults import STOP_EXIT_CODE, Stopped
    from jaxpar.train.goodput import process_start
    from jaxpar.train.run import train
    from jaxpar.diloco.islands import IslandError

    try:
        train(cfg, started=process_start())
    except ConfigError as e:  # found while building (e.g. a user factory that cannot import),
        print(f"error: {e}", file=sys.stderr)  # or a resume the run folder refuses
        return 2
    except Stopped as e:  # a non-finite step under train.nonfinite=stop
        print(f"stopped: {e}", file=sys.stderr)
        return STOP_EXIT_CODE
    except IslandError as e:  # the islands protocol at run time (the store, a fall behind):
        print(f"error: {e}", file=sys.stderr)  # the same command restarts and rejoins
        return ISLAND_EXIT_CODE
    return 0


def _exit(code: int) -> None:
    """Exit with `code`. A failing process of a group exits at once (`os._exit`): a normal
    exit waits in jax.distributed's shutdown barrier for every peer, and a peer that is
    stopped or dead would hold it there until the coordination service's heartbeat timeout
    (100 s), past the start-up and hang bounds the run promises."""
    jax = sys.modules.get("jax")
    if code and jax is not None and jax.process_count() > 1:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    try:
        _code = main()
    except BaseException as e:  # noqa: BLE001 - a traceback, then out without the barrier
        if isinstance(e, SystemExit):
            _code = e.code if isinstance(e.code, int) else 1
        else:
            import traceback
            traceback.print_exc()
            _code = 1
    _exit(_code)
