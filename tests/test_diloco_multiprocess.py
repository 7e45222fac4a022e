"""Two real processes (jax.distributed, gloo, 4 CPU devices each, one replica per process)
give the same Streaming DiLoCo result as one process with 8 devices."""
import os
import socket
import subprocess
import sys

import jax.tree_util as tu
import numpy as np
import pytest

import diloco_multiprocess_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    port, out = free_port(), tmp_path / "two.npz"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "diloco_multiprocess_worker.py"),
                               str(port), str(i), str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"

    two = np.load(out)
    np.testing.assert_array_equal(two["replica_procs"], [[0], [1]])  # replicas split across processes
    n = 0
    for how in worker.COLLECTIVES:  # the all-gather of codes, and the all_to_all + all-gather
        one = worker.run(how)  # this pytest process: 8 devices, same mesh
        flat = tu.tree_flatten_with_path({"global": one["global"], "replicas": one["replicas"]})[0]
        n += len(flat)
        for path, v in flat:
            key = how + "/" + "/".join(str(k) for k in path)
            np.testing.assert_allclose(two[key], v, rtol=1e-6, atol=1e-7, err_msg=key)
    assert n == len(two.files) - 1
    # and training happened: replicas differ from each other (they saw different data)
    assert not np.allclose(one["replicas"]["head"][0], one["replicas"]["head"][1])
