"""jaxpar.testing: test a sharded model on XLA host device meshes.

    pytest -p jaxpar.testing --host-devices 8        # the plugin (jaxpar/testing/plugin.py)

    from jaxpar.testing import check_layouts
    report = check_layouts(factory, layouts=[{"data": 8}, {"fsdp": 4, "tensor": 2}],
                           overrides=["model.embed=64", "train.seq_len=64"], steps=2)
    print(report)

`check_layouts` (layouts.py) trains a `model.module` factory with the trainer's compiled step
on each layout and compares every step's loss and gradients with a 1-device run;
`find_full_gathers` (gathers.py) lists the all-gathers that rebuild a model-parallel param
whole. docs/testing.md walks through both.
"""
from jaxpar.testing.gathers import find_full_gathers
from jaxpar.testing.layouts import Report, assert_steps_close, check_layouts
from jaxpar.testing.plugin import (host_devices, host_mesh, pytest_addoption, pytest_configure,
                                   pytest_load_initial_conftests, use_host_devices, xla_flags)

__all__ = ["check_layouts", "assert_steps_close", "Report", "find_full_gathers",
           "use_host_devices", "xla_flags", "host_devices", "host_mesh", "pytest_addoption",
           "pytest_configure", "pytest_load_initial_conftests"]
