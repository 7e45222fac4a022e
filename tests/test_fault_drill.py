"""Fault injection with real processes (2 x 4 CPU devices, `launch.py --restarts 2`): a
process SIGSTOPped is found by the hang watchdog within T and the group restarted; later a
process SIGKILLed is found by the launcher and the group restarted; the run finishes with
the same losses as a clean run.
`scripts/fault_drill.py --out docs/reliability_faults.json` writes these figures for docs."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
T = 30.0  # above a checkpoint save's step-to-step gap on a loaded 2-core CPU


def drill_module():
    spec = importlib.util.spec_from_file_location("fault_drill", ROOT / "scripts/fault_drill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_sigstop_then_sigkill_are_detected_restarted_and_lose_nothing(tmp_path):
    every = 10
    r = drill_module().run(tmp_path, steps=60, every=every, at=25, at2=45, hang_timeout_s=T)
    assert r["final_returncode"] == 0 and r["same_steps_as_clean"], r
    assert r["losses_compared"] == 61  # 60 steps + the final eval
    assert r["max_abs_loss_diff_vs_clean"] <= 1e-6, r  # fp32, same mesh, resumed twice
    stop, kill = r["faults"]
    for f in (stop, kill):
        c = f["step_at_fault"] // every * every  # the newest checkpoint at the fault
        assert f["resumed_from_step"] in (c, c - every), f  # c if its commit had finished
        assert f["steps_lost"] == f["step_at_fault"] - f["resumed_from_step"]
    assert stop["exit_code"] == 4 and T - 1 <= stop["detection_latency_s"] <= T + 5, stop
    assert "behind: process 1" in stop["hang_line"] and "stopped or dead" in stop["hang_line"]
    assert kill["exit_code"] == -9 and kill["detection_latency_s"] <= 3, kill
    assert kill["hang_line"] is None
    assert r["ok"]
