"""`attention.impl=auto`: the cost model (`jaxpar.attention.auto`) picks the schedule once,
before anything is built, and the run folder records it (attention_choice.json).

The mesh's sequence shards S = mesh.seq · mesh.seq_inner are arranged freely: Ulysses, ring
or TokenRing over all S (mesh.seq = S), or the hybrid for a split S = ring × Ulysses
(mesh.seq = ring, mesh.seq_inner = Ulysses) with ring or TokenRing outside. The model
sees the heads of one tensor shard, head_dim, train.seq_len, the per-shard batch, the
compute dtype and causal attention. Everything downstream sees the resolved config.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxpar.train.config import Config, head_dim


def resolve(cfg: Config):
    """(config with attention.impl/ring_impl and mesh.seq/seq_inner set, auto.Choice or
    None). Unchanged when attention.impl is not auto; S = 1 resolves to dense."""
    if cfg.attention.impl != "auto":
        return cfg, None
    from jaxpar.attention import auto

    m, mo, t = cfg.mesh, cfg.model, cfg.train
    shards = m.seq * m.seq_inner
    if shards == 1:
        return _with(cfg, "dense", "ring", 1, 1), None
    tensor = m.tensor if mo.heads % m.tensor == 0 and mo.kv_heads % m.tensor == 0 else 1
    batch_shards = m.data * (1 if cfg.diloco.enabled else m.replica)
    choice = auto.choose(auto.flexible(shards), batch=max(1, t.batch_size // batch_shards),
                         seq_len=t.seq_len, heads=mo.heads // tensor,
                         kv_heads=mo.kv_heads // tensor, head_dim=head_dim(cfg),
                         dtype=mo.dtype, causal=True)
    pick = choice.pick
    if pick.impl == "hybrid":
        return _with(cfg, "hybrid", pick.ring_impl, *pick.shards), choice
    return _with(cfg, pick.impl, "ring", shards, 1), choice


def _with(cfg, impl, ring_impl, seq, seq_inner):
    return dataclasses.replace(
        cfg, attention=dataclasses.replace(cfg.attention, impl=impl, ring_impl=ring_impl),
        mesh=dataclasses.replace(cfg.mesh, seq=seq, seq_inner=seq_inner))


def apply(cfg: Config, lead: bool = True) -> Config:
    """Resolve attention.impl=auto; print the pick and predicted times and write them to
    <run_dir>/attention_choice.json (lead process). Other configs pass through."""
    resolved, choice = resolve(cfg)
    if choice is not None and lead:
        print(choice.summary(), flush=True)
        run_dir = Path(cfg.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record = choice.to_json() | {"mesh": {"seq": resolved.mesh.seq,
                                              "seq_inner": resolved.mesh.seq_inner}}
        (run_dir / "attention_choice.json").write_text(json.dumps(record, indent=1) + "\n")
    return resolved
