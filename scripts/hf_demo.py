"""Context extension end to end, small enough for a CPU: pretrain a byte-level base model at
64 tokens, export it as a Hugging Face Llama folder, import it with `model.init_from` and
continue pretraining at 256 tokens (4x) with linear RoPE scaling and TokenRing (and, as a
control, with plain RoPE), export again.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/hf_demo.py [OUT_JSON]

Writes runs/hf_demo/ (run folders, HF folders) and OUT_JSON (default docs/hf_demo.json)
with every number docs/hf.md quotes.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jaxpar import convert
from jaxpar.bench import machine
from jaxpar.train import load_config, train

ROOT = Path("runs/hf_demo")
BASE_LEN, LONG_LEN = 64, 256
COMMON = ["eval.sample_bytes=0", "eval.batches=4", "checkpoint.keep=1", "train.log_every=20"]
LONG_MESH = ["mesh.data=2", "mesh.seq=2", "mesh.tensor=2", "attention.impl=tokenring",
             f"train.seq_len={LONG_LEN}", "train.batch_size=4"]
LINEAR4 = "model.rope_scaling={rope_type: linear, factor: 4.0}"


def run(name: str, overrides: list[str], base: str | None = None) -> dict:
    t = time.perf_counter()
    cfg = load_config(base, [f"train.run_dir={ROOT / name}", *COMMON, *overrides])
    s = train(cfg)
    return {"name": name, "overrides": overrides, "final_eval_loss": s["final_eval_loss"],
            "evals": s["evals"], "tokens_per_s": s["tokens_per_s"],
            "wall_s": round(time.perf_counter() - t, 1)}


def main(out_json: str = "docs/hf_demo.json") -> None:
    results = {"machine": machine(), "runs": []}
    # 1. the "released" base model: 64-token context
    base = ["model.layers=2", "model.embed=64", "model.heads=4", "model.kv_heads=2",
            "model.mlp=192", f"model.max_positions={BASE_LEN}", f"train.seq_len={BASE_LEN}",
            "train.batch_size=16", "train.steps=300", "eval.every=100", "mesh.data=4",
            "mesh.tensor=2"]
    results["runs"].append(run("base", base, "configs/base.yaml"))
    convert.main(["to-hf", str(ROOT / "base"), str(ROOT / "base_hf")])
    hf = str(ROOT / "base_hf")
    results["base_hf_config"] = json.loads((ROOT / "base_hf" / "config.json").read_text())
    # 2. the imported model (model keys from its config.json) at 4x its context, before any
    # training (train.lr=0, one step)
    frozen = [f"model.init_from={hf}", "train.lr=0", "train.steps=1", "eval.every=0"]
    results["runs"].append(run("at_4x_no_scaling", frozen + LONG_MESH))
    results["runs"].append(run("at_4x_linear", frozen + LONG_MESH + [LINEAR4]))
    # 3. continued pretraining at 4x with TokenRing: linear scaling, and plain RoPE as control
    cont = [f"model.init_from={hf}", "train.steps=200", "train.lr=1e-3", "eval.every=50"]
    results["runs"].append(run("extend_4x", cont + LONG_MESH + [LINEAR4]))
    results["runs"].append(run("extend_4x_plain_rope", cont + LONG_MESH))
    convert.main(["to-hf", str(ROOT / "extend_4x"), str(ROOT / "extend_4x_hf")])
    results["extended_hf_config"] = json.loads(
        (ROOT / "extend_4x_hf" / "config.json").read_text())
    Path(out_json).write_text(json.dumps(results, indent=1) + "\n")
    for r in results["runs"]:
        print(f"{r['name']:18s} eval loss {r['final_eval_loss']:.4f}  ({r['wall_s']} s)")


if __name__ == "__main__":
    main(*sys.argv[1:])
