"""Streaming DiLoCo islands as real processes: each island is its own process with its own 4
CPU devices (no jax.distributed across islands); they share only a folder store."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import diloco_islands_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.slow


class Islands:
    """Worker processes, each in its own process group, all killed on every exit path."""

    def __init__(self, tmp_path):
        self.tmp, self.procs = tmp_path, []
        self.env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        self.env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE),
                                                  self.env.get("PYTHONPATH", "")])

    def start(self, k, *args, store="store", tag=""):
        log = open(self.tmp / f"{k}{tag}.log", "w")
        cmd = [sys.executable, os.path.join(HERE, "diloco_islands_worker.py"),
               "--store", str(self.tmp / store), "--id", str(k),
               "--out", str(self.tmp / f"{k}.npz"), *map(str, args)]
        p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def wait(self, p, timeout=240):
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"island process {p.args} did not finish in {timeout} s")

    def log(self, k, tag=""):
        return (self.tmp / f"{k}{tag}.log").read_text()

    def result(self, k):
        z = np.load(self.tmp / f"{k}.npz")
        return {f: z[f] for f in z.files} | {"rounds": json.loads(str(z["rounds"]))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _state(res):
    return [v for k, v in sorted(res.items()) if k[0] in "go" and k[1:].isdigit()]


@pytest.mark.parametrize("quantize", ["none", "fp4_e3m0"])
def test_two_island_processes_equal_single_program(tmp_path, quantize):
    with Islands(tmp_path) as isl:
        procs = [isl.start(k, "--count", 2, "--quantize", quantize) for k in range(2)]
        for k, p in enumerate(procs):
            assert isl.wait(p) == 0, isl.log(k)
        got = [isl.result(k) for k in range(2)]
    ref_losses, ref_glob = worker.reference(quantize)  # this process: 8 devices, replica=2
    for k in range(2):
        np.testing.assert_array_equal(got[k]["steps"], np.arange(1, worker.STEPS + 1))
        np.testing.assert_allclose(got[k]["losses"], ref_losses[:, k], rtol=0, atol=1e-5)
    for a, b in zip(_state(got[0]), _state(got[1])):
        np.testing.assert_array_equal(a, b)  # bitwise, θ_global and the outer state
    ref = jax.tree.leaves(ref_glob)
    for i, x in enumerate(ref):
        np.testing.assert_allclose(got[0][f"g{i}"], x, rtol=0, atol=1e-5)
    assert all(r["members"] == [0, 1] for r in got[0]["rounds"])
    assert len(got[0]["rounds"]) == worker.STEPS // (worker.H // worker.P)
    # the replicas trained apart: the losses of the two islands differ
    assert np.max(np.abs(got[0]["losses"] - got[1]["losses"])) > 1e-3


def test_island_of_two_processes_beside_island_of_one(tmp_path):
    """Island 0 is 2 processes (jax.distributed inside the island, 2 CPU devices each, its
    replica sharded over both); island 1 is 1 process. Same numbers as the single program."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Islands(tmp_path) as isl:
        procs = [isl.start(0, "--count", 2, "--procs", 2, "--proc", i, "--port", port,
                           *(["--out", tmp_path / "0p1.npz"] if i else []), tag=f"p{i}")
                 for i in range(2)]
        procs.append(isl.start(1, "--count", 2))
        for p, name in zip(procs, ("0p0", "0p1", "1")):
            assert isl.wait(p) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        got = [isl.result(0), isl.result(1)]
        second = np.load(tmp_path / "0p1.npz")
    ref_losses, _ = worker.reference("none")
    for k in range(2):
        np.testing.assert_allclose(got[k]["losses"], ref_losses[:, k], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(second["losses"], got[0]["losses"])
    for a, b, c in zip(_state(got[0]), _state(got[1]), _state(dict(second))):
        np.testing.assert_array_equal(a, b)  # bitwise across islands...
        np.testing.assert_array_equal(a, c)  # ...and across the processes of island 0
    assert all(r["members"] == [0, 1] for r in got[1]["rounds"])


def test_kill_one_of_three_islands_and_rejoin(tmp_path):
    """SIGKILL island 2 at a seeded step; 0 and 1 go on, waiting at most wait_s once; the
    restarted island 2 adopts the store's state and rejoins; θ_global bit-identical at the end."""
    wait_s, steps = 3.0, 61
    die_at = random.Random(21).randint(5, 12)
    common = ["--count", 3, "--steps", steps, "--step-sleep", 0.25, "--wait-s", wait_s]
    with Islands(tmp_path) as isl:
        survivors = [isl.start(k, *common) for k in range(2)]
        victim = isl.start(2, *common, "--die-at", die_at, tag="-killed")
        assert isl.wait(victim) == -signal.SIGKILL, isl.log(2, "-killed")
        # restart after the survivors closed a few rounds without it, so that "not waited for
        # again" is seen whatever the machine's speed
        later = tmp_path / "store" / "rounds" / f"{die_at // 2 + 6:08d}" / "record.json"
        deadline = time.monotonic() + 120
        while not later.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        t_restart = time.monotonic()
        rejoined = isl.start(2, *common)
        for k, p in enumerate(survivors + [rejoined]):
            assert isl.wait(p) == 0, isl.log(k)
        assert survivors[0].poll() is not None
        got = [isl.result(k) for k in range(3)]
        rejoin_log = isl.log(2)
    for k in (1, 2):
        for a, b in zip(_state(got[0]), _state(got[k])):
            np.testing.assert_array_equal(a, b)  # bitwise on every island
    period = worker.H // worker.P
    long_waits = set()
    for k in (0, 1):
        rounds = got[k]["rounds"]
        assert len(rounds) == (steps - worker.TAU) // period
        assert max(r["wait_s"] for r in rounds) <= wait_s + 1.0  # + reading the deltas
        assert all(r["members"][:2] == [0, 1] for r in rounds)
        long_waits |= {r["round"] for r in rounds if r["wait_s"] >= wait_s - 0.5}
    missed = [r for r in got[0]["rounds"] if 2 not in r["members"]]
    # island 2 is waited for once, by the island that closes the round at its deadline (the
    # other may have started waiting later)...
    first_missed = missed[0]["round"]
    assert max(got[k]["rounds"][first_missed]["wait_s"] for k in (0, 1)) >= wait_s - 0.1
    # ...then not again until it announces its rejoin (which may cost one more wait, if the
    # rejoined island is late for its announced round)
    assert len(missed) >= 4 and len(long_waits) <= 2 and first_missed in long_waits
    first = int(got[2]["first"])  # the step the restarted island starts after
    assert first > die_at and "island 2 rejoins at round" in rejoin_log
    assert got[2]["steps"][0] == first + 1
    back = [r["round"] for r in got[0]["rounds"] if 2 in r["members"] and r["step"] > first]
    assert back and back == list(range(back[0], len(got[0]["rounds"])))  # and stays in
    assert time.monotonic() - t_restart < 240


def test_store_faults_in_processes(tmp_path):
    with Islands(tmp_path) as isl:
        # a torn delta: island 1's write of round 2 loses half its bytes
        procs = [isl.start(0, "--count", 2, "--wait-s", 5),
                 isl.start(1, "--count", 2, "--wait-s", 5, "--corrupt-round", 2)]
        for k, p in enumerate(procs):
            assert isl.wait(p) == 0, isl.log(k)
        got = [isl.result(k) for k in range(2)]
        logs = isl.log(0) + isl.log(1)
        members = {r["round"]: r["members"] for r in got[0]["rounds"]}
        assert members[2] == [0] and members[1] == members[3] == [0, 1]
        line = [ln for ln in logs.splitlines() if "is torn or corrupt" in ln]
        assert line and "rounds/00000002/delta-0001-" in line[0] and "excluded" in line[0]
        for a, b in zip(_state(got[0]), _state(got[1])):
            np.testing.assert_array_equal(a, b)

        # a duplicate id: island 0 runs, a second process claims id 0
        first = isl.start(0, "--count", 2, "--steps", 200, "--step-sleep", 0.1,
                          store="dup", tag="-first")
        deadline = time.monotonic() + 120
        while not (tmp_path / "dup" / "heartbeat").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        dup = isl.start(0, "--count", 2, store="dup", tag="-dup")
        assert isl.wait(dup) == 3
        out = isl.log(0, "-dup").strip().splitlines()
        assert out[-1].startswith("error: diloco.islands.id=0 is already taken") and \
            "Traceback" not in isl.log(0, "-dup")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

        # a missing (uncreatable) store: its parent is a regular file
        (tmp_path / "afile").write_text("x")
        bad = isl.start(0, "--count", 2, store="afile/store", tag="-bad")
        assert isl.wait(bad) == 3
        text = isl.log(0, "-bad")
        assert "Traceback" not in text and "error: sync store" in text and "failed" in text
