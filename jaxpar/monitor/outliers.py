"""Slow steps and slow processes, from step times alone (numpy; no jax).

A step is an outlier when its robust z-score against its own recent history is large:

    z = (t - median(window)) / (1.4826 · MAD(window))

(1.4826·MAD estimates the standard deviation of normal data; median and MAD ignore the
outliers themselves, unlike a mean and standard deviation), and it is also at least
`min_ratio` (2) times the median: step times are so regular that a 30% jitter can score
z > 10, which is not worth a line. Only slow steps are reported.

A process is a straggler when, over several log intervals in a row, its own host time per
step (the time it spends outside waiting on the device: building batches, dispatch, being
descheduled) is well above its peers' median. Collectives are identical on every process
and every step (C4's observation), so on the device all processes wait for the slowest:
their step times are equal, and only the time a process spends *before* it reaches the
collective tells which one the others waited for.
"""
from __future__ import annotations

import collections

import numpy as np

MAD_TO_SIGMA = 1.4826


def robust_z(x: float, history) -> float:
    """Robust z-score of `x` against `history` (median/MAD); 0 for an empty history."""
    h = np.asarray(history, np.float64)
    if h.size == 0:
        return 0.0
    med = np.median(h)
    mad = MAD_TO_SIGMA * np.median(np.abs(h - med))
    # a perfectly regular history has MAD 0: measure against 1% of the median instead
    scale = max(mad, 0.01 * abs(med), 1e-9)
    return float((x - med) / scale)


class OutlierDetector:
    """Step times of one process; `observe` returns a warning for a slow outlier step."""

    def __init__(self, window: int = 50, threshold: float = 6.0, min_ratio: float = 2.0,
                 min_history: int = 10):
        self.history = collections.deque(maxlen=window)
        self.threshold = threshold
        self.min_ratio = min_ratio  # a very regular history makes small jitter "significant"
        self.min_history = min_history

    def observe(self, step: int, seconds: float, *, judge: bool = True) -> str | None:
        """Record a step time. With `judge=False` (a step whose window also held an eval or
        a checkpoint) the time is neither judged nor kept in the history."""
        if not judge:
            return None
        warning = None
        if len(self.history) >= self.min_history:
            z = robust_z(seconds, self.history)
            med = float(np.median(self.history))
            if z > self.threshold and seconds >= self.min_ratio * med:
                warning = (f"step {step} took {seconds:.3f} s, {seconds / med:.1f}x the median "
                           f"{med:.3f} s of the last {len(self.history)} steps (robust z {z:.0f})")
        # an outlier stays out of the history, so one stall does not shift the baseline
        if warning is None:
            self.history.append(seconds)
        return warning


def slow_peers(host_s_P, *, ratio: float = 1.5, min_gap_s: float = 0.005) -> list[int]:
    """Processes whose host time per step exceeds the other processes' median by `ratio`
    and by at least `min_gap_s` seconds (so microsecond noise on an idle host is ignored)."""
    t = np.asarray(host_s_P, np.float64)
    out = []
    for p in range(t.size):
        peers = np.delete(t, p)
        if peers.size == 0:
            continue
        ref = float(np.median(peers))
        if t[p] > ratio * ref and t[p] - ref > min_gap_s:
            out.append(p)
    return out


class PeerTracker:
    """Names a process that is slower than its peers in `patience` log intervals in a row."""

    def __init__(self, num_processes: int, *, patience: int = 3, ratio: float = 1.5,
                 min_gap_s: float = 0.005):
        self.streak = [0] * num_processes
        self.patience, self.ratio, self.min_gap_s = patience, ratio, min_gap_s

    def update(self, host_s_P) -> list[int]:
        """Per-process host seconds per step of one interval; returns the processes that
        have just been slow for `patience` intervals (each reported once per streak)."""
        slow = set(slow_peers(host_s_P, ratio=self.ratio, min_gap_s=self.min_gap_s))
        now = []
        for p in range(len(self.streak)):
            self.streak[p] = self.streak[p] + 1 if p in slow else 0
            if self.streak[p] == self.patience:
                now.append(p)
        return now
