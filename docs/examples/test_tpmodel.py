"""Tests of tpmodel.py (and of mymodel.py, docs/sharding.md's plain Flax model) on 8 host
devices; docs/testing.md shows what they print. From the repository root:

    PYTHONPATH=docs/examples pytest -p jaxpar.testing --host-devices 8 -s \
        docs/examples/test_tpmodel.py
"""
import mymodel
import pytest
import tpmodel

from jaxpar.testing import check_layouts

LAYOUTS = [{"data": 8}, {"fsdp": 8}, {"data": 4, "tensor": 2}, {"fsdp": 4, "tensor": 2}]


def test_tpmodel_on_every_layout():
    report = check_layouts(tpmodel.tp_factory, LAYOUTS, steps=3)
    print(f"\n{report}")
    assert not any(r["full_gathers"] for r in report)


def test_plain_flax_model_on_tensor_layouts():
    report = check_layouts(mymodel.linen_factory, LAYOUTS[2:], overrides=["model.layers=1"])
    print(f"\n{report}")


def test_textbook_psum_of_dx_is_caught():
    with pytest.raises(AssertionError, match="loss matches but gradients differ") as e:
        check_layouts(tpmodel.psum_dx_factory, [{"data": 4, "tensor": 2}])
    print(f"\n{e.value}")


def test_forgotten_row_psum_is_caught():
    with pytest.raises(AssertionError, match="loss .* vs .* in the 1-device run") as e:
        check_layouts(tpmodel.no_psum_factory, [{"data": 4, "tensor": 2}])
    print(f"\n{e.value}")


def test_vocab_rule_gathers_the_embedding_whole():
    report = check_layouts(tpmodel.vocab_rule_factory, [{"fsdp": 4, "tensor": 2}])
    print(f"\n{report}")
    assert "embed/embedding" in {g["param"] for g in report[1]["full_gathers"]}
