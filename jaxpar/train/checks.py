"""The semantic checks of a run config, before anything is built or compiled:

    cfg = load_config("configs/demo.yaml", overrides)   # jaxpar.train.config: parsing
    validate(cfg, jax.device_count())                   # here: every check, ConfigError
    cfg = resolve(cfg)                                  # model.vocab, attention.impl=auto

`jaxpar.train.config` holds the dataclasses, the parsing and the resume classification and
imports nothing else of the trainer; this module calls into the parts a config describes
(the model's rules, the attention cost model, the data manifest, HF folders, islands), so
the import graph has no circle. Checks that need a part's own knowledge live with that part
(`data.manifest.check_tokens`, `hf.check_weights`, `models.rope.check`,
`train.model.check_config_rules`, `diloco.islands.islands_config`,
`train.profile.profile_config`, `train.metrics.wandb_config`) and are called here in one
line each.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

from jaxpar._spmd import divisors
from jaxpar.train.config import _SECTION_TYPES, Config, ConfigError, _closest, head_dim


def _positive(cfg: Config):
    for key in ("mesh.replica", "mesh.data", "mesh.fsdp", "mesh.seq", "mesh.seq_inner",
                "mesh.tensor", "model.layers", "model.embed", "model.heads", "model.kv_heads",
                "model.mlp", "train.steps", "train.batch_size", "train.seq_len",
                "train.log_every", "train.microbatches", "diloco.sync_every",
                "diloco.num_fragments", "checkpoint.keep", "eval.batches"):
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if v < 1:
            raise ConfigError(f"{key}={v} must be a positive integer (>= 1)")
    for key in ("model.head_dim", "model.vocab", "model.max_positions", "train.warmup",
                "checkpoint.every", "eval.every", "eval.sample_bytes", "diloco.overlap_steps",
                "train.seed"):
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if v < 0:
            raise ConfigError(f"{key}={v} must be >= 0")
    if not cfg.train.lr >= 0:  # 0 is allowed: evaluate or export a model unchanged
        raise ConfigError(f"train.lr={cfg.train.lr} must be >= 0 (> 0 to train; 0 keeps the "
                          f"weights)")
    for key in ("model.rope_base", "model.rms_norm_eps"):
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if not v > 0:
            raise ConfigError(f"{key}={v} must be > 0")


def _choice(key: str, value, valid):
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid{_closest(str(value), valid)}; "
                          f"choose one of {list(valid)}")


def validate(cfg: Config, device_count: int) -> None:
    """Every check that needs no compilation; raises ConfigError naming the key."""
    from jaxpar.attention import IMPLS
    from jaxpar.diloco.quantize import FORMATS
    from jaxpar.mesh import MeshConfig
    from jaxpar.overlap import DIRECTIONS, OVERLAPS
    from jaxpar.train.faults import POLICIES

    _positive(cfg)
    _check_data(cfg)
    cfg = resolve(cfg)
    m, mo, a, d, t = cfg.mesh, cfg.model, cfg.attention, cfg.diloco, cfg.train
    _choice("attention.impl", a.impl, IMPLS)
    _choice("attention.ring_impl", a.ring_impl, ("ring", "tokenring"))
    _choice("overlap.mode", cfg.overlap.mode, OVERLAPS)
    _choice("overlap.direction", cfg.overlap.direction, DIRECTIONS)
    _choice("diloco.quantize", d.quantize, FORMATS)
    _choice("model.dtype", mo.dtype, ("float32", "bfloat16"))
    _choice("train.nonfinite", t.nonfinite, POLICIES)
    _check_stacking(cfg)
    mesh = MeshConfig(**dataclasses.asdict(m))
    try:
        mesh.validate(device_count)
    except ValueError as e:
        raise ConfigError(str(e).replace("mesh ", "mesh.* = ", 1)) from None

    from jaxpar.train.model import check_config_rules  # rules need the model's names

    check_config_rules(cfg)
    if not mo.module:
        _check_builtin_model(cfg)
    seq_shards = m.seq * m.seq_inner
    if a.impl == "dense" and seq_shards > 1:
        raise ConfigError(f"attention.impl=dense runs unsharded attention, so it needs mesh.seq=1 "
                          f"and mesh.seq_inner=1 (got {m.seq}, {m.seq_inner}); choose "
                          f"attention.impl in ['ulysses', 'ring', 'tokenring', 'hybrid']")
    if a.impl != "hybrid" and m.seq_inner > 1:
        raise ConfigError(f"mesh.seq_inner={m.seq_inner} is only used by attention.impl=hybrid; "
                          f"set mesh.seq_inner=1 or attention.impl=hybrid")
    act = seq_shards * m.tensor
    if t.seq_len % act:
        raise ConfigError(f"train.seq_len={t.seq_len} must be divisible by mesh.seq·seq_inner·"
                          f"tensor={act} (activations are sharded over all three); e.g. "
                          f"train.seq_len={act * max(1, t.seq_len // act)}")
    zig = 2 * m.seq  # zigzag: 2·P chunks over the ring (seq) axis
    if a.impl in ("ring", "tokenring", "ulysses", "hybrid") and t.seq_len % (zig * m.seq_inner
                                                                             * m.tensor):
        unit = zig * m.seq_inner * m.tensor
        raise ConfigError(f"train.seq_len={t.seq_len} must be divisible by {unit} for the causal "
                          f"zigzag layout (2·mesh.seq={zig} chunks, each split over "
                          f"seq_inner·tensor)"
                          f"; e.g. train.seq_len={unit * max(1, t.seq_len // unit)}")
    batch_shards = m.data * m.fsdp * (1 if d.enabled else m.replica)
    who = "mesh.data·fsdp" if d.enabled else "mesh.replica·data·fsdp"
    if t.batch_size % batch_shards:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by {who}="
                          f"{batch_shards}; e.g. train.batch_size="
                          f"{batch_shards * max(1, t.batch_size // batch_shards)}")
    unit = batch_shards * t.microbatches  # every microbatch is split over the batch axes
    if t.batch_size % unit:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by "
                          f"train.microbatches={t.microbatches} × {who}={batch_shards}; e.g. "
                          f"train.batch_size={unit * max(1, t.batch_size // unit)} or "
                          f"train.microbatches in "
                          f"{divisors(t.batch_size // batch_shards)}")
    if d.enabled:
        if d.sync_every % d.num_fragments:
            raise ConfigError(f"diloco.sync_every={d.sync_every} must be divisible by "
                              f"diloco.num_fragments={d.num_fragments}; valid num_fragments: "
                              f"{[p for p in divisors(d.sync_every) if p <= mo.layers]}")
        if not mo.module and d.num_fragments > mo.layers:
            raise ConfigError(f"diloco.num_fragments={d.num_fragments} needs at least that many "
                              f"layers (model.layers={mo.layers})")
        if d.overlap_steps >= d.sync_every // d.num_fragments:
            raise ConfigError(f"diloco.overlap_steps={d.overlap_steps} must be < diloco.sync_every"
                              f"/num_fragments={d.sync_every // d.num_fragments}")
        if not 0.0 <= d.alpha <= 1.0:
            raise ConfigError(f"diloco.alpha={d.alpha} must be in [0, 1]")
    if d.islands:
        from jaxpar.diloco.islands import IslandError, islands_config

        if not d.enabled:
            raise ConfigError("diloco.islands needs diloco.enabled=true")
        if cfg.train.nonfinite == "rollback":  # it would rewind behind the others' rounds
            raise ConfigError("train.nonfinite=rollback cannot be used with diloco.islands (a "
                              "rollback rewinds one island behind the rounds the others "
                              "closed); use train.nonfinite=skip or stop")
        try:
            wait_s = islands_config(d.islands).wait_s
        except IslandError as e:
            raise ConfigError(str(e)) from None
        hang = cfg.train.hang_timeout_s  # a round's wait happens between two steps' beats
        if hang and wait_s >= hang:
            raise ConfigError(f"diloco.islands.wait_s={wait_s:g} must be < train.hang_timeout_s="
                              f"{hang:g}: the hang watchdog would end an island that waits for "
                              f"a missing one")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in (0, 1)")
    from jaxpar.train.metrics import wandb_config
    from jaxpar.train.profile import profile_config

    _config_error(profile_config, t.profile)
    _config_error(wandb_config, cfg.metrics.wandb)
    _check_run_dir(t.run_dir)
    check_ranges(cfg)
    check_byte_corpus(cfg)


def _check_data(cfg: Config):
    if cfg.data.path is not None and not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path={cfg.data.path!r} does not exist; give a prepared dataset "
                          f"folder, a text file, a folder of text files, or data.path=null for "
                          f"the bundled corpus")
    data_vocab = _data_vocab(cfg)
    # smaller would put token ids past the embedding (larger: check_tokens below)
    if cfg.model.vocab and cfg.model.vocab < data_vocab:
        kind = "its manifest" if _prepared(cfg) else "byte-level data has token ids 0..255"
        raise ConfigError(f"model.vocab={cfg.model.vocab} must be >= {data_vocab}, the data's "
                          f"vocabulary ({kind}; data.path={cfg.data.path!r}); set model.vocab="
                          f"{data_vocab} or leave it unset (0)")
    from jaxpar import hf
    from jaxpar.data.manifest import check_tokens

    mo = cfg.model
    if mo.init_from:
        _config_error(hf.check_weights, mo.init_from, key=f"model.init_from={mo.init_from!r}")
    _config_error(check_tokens, cfg.data.path, model_vocab=mo.vocab, init_from=mo.init_from,
                  reason=cfg.data.tokenizer_mismatch)


def _config_error(check, *args, key: str = "", **kw):
    """Run a check that lives next to the code it guards; its ValueError as a ConfigError."""
    try:
        check(*args, **kw)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}" if key else str(e)) from None


def _data_vocab(cfg: Config) -> int:
    from jaxpar.data.manifest import data_vocab

    try:
        return data_vocab(cfg.data.path)
    except ValueError as e:
        raise ConfigError(f"data.path: {e}") from None


def resolve(cfg: Config) -> Config:
    """Fill the keys that come from elsewhere: model.vocab=0 -> the data's vocabulary;
    attention.impl=auto -> the schedule the cost model picks (`attention_choice`)."""
    from jaxpar.train.attention_choice import resolve as resolve_attention

    if not cfg.model.vocab:
        cfg = cfg.replace(model={"vocab": _data_vocab(cfg)})
    return resolve_attention(cfg)[0]


def _check_stacking(cfg: Config):
    """model.remat / model.scan_layers: the built-in decoder's blocks only."""
    from jaxpar.models.blocks import REMAT_POLICIES

    mo, d = cfg.model, cfg.diloco
    _choice("model.remat", mo.remat, REMAT_POLICIES)
    if mo.module and (mo.remat != "none" or mo.scan_layers):
        key = "model.remat" if mo.remat != "none" else "model.scan_layers"
        raise ConfigError(f"{key} applies to the built-in decoder; model.module="
                          f"{mo.module!r} stacks its own blocks (wrap them in nn.remat / "
                          f"nn.scan there), so leave {key} at its default")
    if mo.scan_layers and d.enabled and d.num_fragments > 1:
        raise ConfigError(f"model.scan_layers=true stacks all layers into one param tree, which "
                          f"Streaming DiLoCo cannot split by layer; use diloco.num_fragments=1 "
                          f"(got {d.num_fragments}) or model.scan_layers=false")


def _check_builtin_model(cfg: Config):
    m, mo, a = cfg.mesh, cfg.model, cfg.attention
    if mo.heads % mo.kv_heads:
        raise ConfigError(f"model.heads={mo.heads} must be a multiple of model.kv_heads="
                          f"{mo.kv_heads}; valid kv_heads: {divisors(mo.heads)}")
    if not mo.head_dim and mo.embed % mo.heads:
        raise ConfigError(f"model.embed={mo.embed} must be divisible by model.heads={mo.heads} "
                          f"(or set model.head_dim)")
    if head_dim(cfg) % 2:
        raise ConfigError(f"model.head_dim={head_dim(cfg)} must be even (RoPE rotates pairs)")
    from jaxpar.models import rope

    try:
        rope.check(mo.rope_scaling, mo.max_positions or cfg.train.seq_len, "model.rope_scaling")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # (model.vocab need not divide: the table is padded to a multiple of mesh.tensor)
    for key, v in (("model.heads", mo.heads), ("model.mlp", mo.mlp)):
        if v % m.tensor:
            valid = divisors(math.gcd(mo.heads, mo.mlp))
            raise ConfigError(f"{key}={v} must be divisible by mesh.tensor={m.tensor} "
                              f"(tensor parallelism splits it); mesh.tensor in {valid} would fit")
    if mo.kv_heads % m.tensor and m.tensor % mo.kv_heads:  # fewer: replicated (transformer.py)
        valid = sorted(set(divisors(mo.kv_heads)) | {t for t in divisors(math.gcd(mo.heads,
                                                     mo.mlp)) if t % mo.kv_heads == 0})
        raise ConfigError(f"model.kv_heads={mo.kv_heads} must divide or be a multiple of "
                          f"mesh.tensor={m.tensor} (split over it, or replicated when fewer); "
                          f"mesh.tensor in {valid} would fit")
    if "embed" not in cfg.sharding.rules and mo.embed % m.fsdp:
        valid = [x for x in divisors(mo.embed) if x <= 64]
        raise ConfigError(f"model.embed={mo.embed} must be divisible by mesh.fsdp={m.fsdp} "
                          f"(the rule embed -> fsdp splits every weight on it); mesh.fsdp in "
                          f"{valid} would fit")
    h, kh = mo.heads // m.tensor, max(1, mo.kv_heads // m.tensor)  # on one tensor shard
    ulysses = {"ulysses": ("mesh.seq", m.seq), "hybrid": ("mesh.seq_inner", m.seq_inner)}
    if a.impl in ulysses:
        key, p = ulysses[a.impl]
        if h % p or (kh % p and p % kh):
            valid = [x for x in divisors(h) if kh % x == 0 or x % kh == 0]
            raise ConfigError(
                f"attention.impl={a.impl} splits the {h} query heads (and {kh} kv heads) of one "
                f"tensor shard over {key}={p}; {key} in {valid} would fit, or use "
                f"attention.impl=ring or tokenring")


def _check_run_dir(run_dir: str):
    path = Path(run_dir)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"train.run_dir={run_dir!r}: {probe} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"train.run_dir={run_dir!r} is not writable ({e.strerror} in {probe}); "
                          f"choose another train.run_dir") from None


# ------------------------------------------------------------------------- value ranges
# Values that parse and fit the mesh but would train garbage or fail after compiling.

SEED_LIMIT = 2**63  # numpy and jax.random take seeds below this


def _in(key: str, v: float, lo: float, hi: float, *, lo_open=False, hi_open=False, why=""):
    lo_ok = v > lo if lo_open else v >= lo
    hi_ok = v < hi if hi_open else v <= hi
    if not (lo_ok and hi_ok):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{key}={v} must be in {rng}{why}")


def check_ranges(cfg: Config) -> None:
    """Optimizer, schedule, DiLoCo outer step, eval and sampling settings."""
    for section, cls in _SECTION_TYPES.items():  # .nan / .inf read from YAML
        for f in dataclasses.fields(cls):
            v = getattr(getattr(cfg, section), f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{section}.{f.name}={v} must be a finite number")
    t, d, e, a = cfg.train, cfg.diloco, cfg.eval, cfg.attention
    if not t.clip > 0:
        raise ConfigError(f"train.clip={t.clip} must be > 0 (the global gradient-norm bound; "
                          f"0 zeroes every update, a negative one reverses it)")
    _in("train.b2", t.b2, 0.0, 1.0, hi_open=True, why=" (Adam's second-moment decay)")
    _in("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0, why=" (final lr / train.lr)")
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay} must be >= 0")
    if t.lr * t.weight_decay >= 1:
        raise ConfigError(f"train.lr·weight_decay={t.lr * t.weight_decay:g} must be < 1 "
                          f"(AdamW scales params by 1 - lr·weight_decay each step)")
    if t.seed >= SEED_LIMIT:
        raise ConfigError(f"train.seed={t.seed} must be < 2**63")
    for key in ("hang_timeout_s", "startup_timeout_s"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 0 (0 = no hang "
                              f"watchdog)")
    if not t.preempt_grace_s > 0:
        raise ConfigError(f"train.preempt_grace_s={t.preempt_grace_s} must be > 0 (seconds "
                          f"from SIGTERM to SIGKILL that the scheduler grants)")
    if t.peak_tflops < 0:
        raise ConfigError(f"train.peak_tflops={t.peak_tflops} must be >= 0 (0 = look up the "
                          f"device kind)")
    if not d.outer_lr > 0:
        raise ConfigError(f"diloco.outer_lr={d.outer_lr} must be > 0")
    _in("diloco.outer_momentum", d.outer_momentum, 0.0, 1.0, hi_open=True,
        why=" (Nesterov momentum of the outer SGD; 0 = none)")
    if a.impl != "hybrid" and a.ring_impl != "ring":
        raise ConfigError(f"attention.ring_impl={a.ring_impl!r} is only used by "
                          f"attention.impl=hybrid (got attention.impl={a.impl!r}); remove it "
                          f"or set attention.impl=hybrid")
    if cfg.overlap.mode == "none" and cfg.overlap.direction != "uni":
        raise ConfigError(f"overlap.direction={cfg.overlap.direction!r} is only used with "
                          f"overlap.mode=collective_matmul or auto (got overlap.mode='none')")
    if e.sample_bytes and not e.prompt:
        raise ConfigError(f"eval.prompt='' leaves nothing to continue; give a prompt or set "
                          f"eval.sample_bytes=0 (got eval.sample_bytes={e.sample_bytes})")


def corpus_bytes(path: str | None, separator: str) -> int:
    """Length in bytes of the byte corpus `data.path` names (sizes only, nothing read)."""
    from jaxpar.data import DEFAULT_CORPUS

    p = Path(path) if path is not None else DEFAULT_CORPUS
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
        if not files:
            raise ConfigError(f"data.path={path!r} is an empty folder; give a text file or a "
                              f"folder of text files")
        return sum(f.stat().st_size for f in files) + len(separator.encode()) * (len(files) - 1)
    return p.stat().st_size


def check_byte_corpus(cfg: Config) -> None:
    """The byte-level corpus: big enough for the train and eval splits, and a vocab that
    holds every byte. (A tokenized data source adds its own check here.)"""
    mo, t, frac = cfg.model, cfg.train, cfg.data.eval_fraction
    if cfg.data.path is not None and not Path(cfg.data.path).exists():
        return  # reported by validate
    if _prepared(cfg):
        return check_token_dataset(cfg)
    if mo.vocab < 256:
        raise ConfigError(f"model.vocab={mo.vocab} must be >= 256: byte-level data has token "
                          f"ids 0..255 (vocab 256)")
    n = corpus_bytes(cfg.data.path, cfg.data.doc_separator)
    need = 20 * (t.seq_len + 1)
    if n < need:
        raise ConfigError(f"data.path={cfg.data.path!r} holds {n} bytes; train.seq_len="
                          f"{t.seq_len} needs at least 20·(seq_len+1)={need}; use a bigger "
                          f"corpus or a smaller train.seq_len")
    n_eval = n - int(n * (1 - frac))  # the split ByteData.load makes
    n_train = n - n_eval
    if n_eval < t.seq_len + 2 or n_train < t.seq_len + 2:
        small = "eval" if n_eval < t.seq_len + 2 else "train"
        raise ConfigError(f"data.eval_fraction={frac} leaves {min(n_eval, n_train)} {small} "
                          f"bytes of {n}; train.seq_len={t.seq_len} needs at least "
                          f"{t.seq_len + 2} in each split; e.g. data.eval_fraction="
                          f"{max(0.05, round((t.seq_len + 2) * 2 / n, 4))}")


def _prepared(cfg: Config) -> bool:
    from jaxpar.data.manifest import looks_prepared

    return cfg.data.path is not None and looks_prepared(Path(cfg.data.path))


def check_token_dataset(cfg: Config) -> None:
    """A prepared dataset: each split holds at least one window of train.seq_len+1 tokens."""
    from jaxpar.data.manifest import read_manifest

    splits = read_manifest(cfg.data.path)["splits"]  # readable: validate checked it
    for name in ("train", "eval"):
        n = splits[name]["tokens"]
        if n < cfg.train.seq_len + 1:
            raise ConfigError(f"data.path={cfg.data.path!r}: the {name} split holds {n} tokens; "
                              f"train.seq_len={cfg.train.seq_len} needs at least "
                              f"{cfg.train.seq_len + 1}; use a smaller train.seq_len")
