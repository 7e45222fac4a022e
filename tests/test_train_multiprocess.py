"""`scripts/launch.py -n 2`: a failing process stops the group; a timeout stops it too. (A
trainer run as 2 processes × 4 CPU devices against 1 × 8: test_train_kill.py.)"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_launch_stops_the_group_when_one_process_fails(tmp_path):
    # process 1 fails at once; process 0 would sleep for a minute: the group is stopped
    code = ("import os, sys, time\n"
            "if os.environ['JAXPAR_PROCESS_ID'] == '1': sys.exit(3)\n"
            "time.sleep(60)\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2",
                        "--log-dir", str(tmp_path), "--", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3
    assert "process 1 exited with 3" in r.stderr


def test_launch_timeout(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2",
                        "--log-dir", str(tmp_path), "--timeout", "1", "--", sys.executable,
                        "-c", "import time; time.sleep(60)"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 124 and "timeout" in r.stderr
