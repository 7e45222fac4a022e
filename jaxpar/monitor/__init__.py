"""Step timings per process, slow steps and stragglers, and the hang watchdog.

    outliers.py   robust z-score (median/MAD) of a step against its own history; a process
                  slower than its peers (numpy only)
    watchdog.py   heartbeats in RUN_DIR/heartbeats/, and a thread that, when no step has
                  finished in T seconds, dumps every thread's stack, names the processes
                  behind and exits with code 4 (no jax)
    steps.py      StepMonitor: the one call the training loop makes per step

`scripts/launch.py --restarts k` restarts a group whose process died or hung; the run
resumes from its last checkpoint. docs/reliability.md has the measured figures.
"""
from jaxpar.monitor.outliers import OutlierDetector, PeerTracker, robust_z, slow_peers
from jaxpar.monitor.watchdog import HANG_EXIT_CODE, Watchdog, behind, read_heartbeats

__all__ = ["OutlierDetector", "PeerTracker", "robust_z", "slow_peers", "HANG_EXIT_CODE",
           "Watchdog", "behind", "read_heartbeats", "StepMonitor"]


def __getattr__(name):  # StepMonitor imports jax; the rest does not
    if name == "StepMonitor":
        from jaxpar.monitor.steps import StepMonitor
        return StepMonitor
    raise AttributeError(name)
