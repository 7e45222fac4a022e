"""A training run: sharded state, the compiled train and eval steps, and the loop.

    run = Run.create(cfg)            # mesh, rules, model, data, optimizer (nothing compiled)
    state = run.init_state()         # params + optimizer state, created in place, sharded
    state, metrics = run.train_step(state, run.batch(step))

Without DiLoCo the state is `TrainState(step, params, opt_state)` and the batch is sharded
on `batch` (replica·data·fsdp) and the token axes; params and Adam moments follow the
rules (`embed -> fsdp`: ZeRO-3). `train.microbatches=k` accumulates k microbatches' fp32
gradients in one step (`jaxpar.train.microbatch`). With `diloco.enabled` it is the library's
`DiLoCoState`: params carry a leading replica axis on the `replica` mesh axis, the inner
step is `jax.vmap(..., spmd_axis_name='replica')` of the same sharded model (so each
replica's step is itself sharded over data/seq/tensor and never talks across replicas), and
`StreamingDiLoCo.update` adds the fragment syncs and merges. With `diloco.islands` the run is
one island of several: the compiled step is `StreamingDiLoCo.inner_update` alone (the rounds
go through the sync store, `jaxpar.train.island`), and its replicas are the global replicas
id·M..id·M+M−1 of count·M, reading the rows those read in the single program.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpar import comm, hf, sharding
from jaxpar.data import ByteData, feed, open_data, pack
from jaxpar.data.tokens import TokenDataset
from jaxpar.diloco import DiLoCoState, StreamingDiLoCo, streaming_diloco
from jaxpar.diloco.islands import IslandsConfig, islands_config
from jaxpar.mesh import MeshConfig, make_mesh
from jaxpar.train import faults, microbatch
from jaxpar.train import model as model_lib
from jaxpar.train.config import Config, ConfigError, head_dim
from jaxpar.train.checks import resolve, validate

# dense bf16 peak TFLOP/s per device, for MFU (train.peak_tflops overrides)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any


def cross_entropy(logits_BNV, targets_BN):
    """Mean next-token cross-entropy in nats."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BNV, targets_BN).mean()


def inner_optimizer(cfg: Config):
    """AdamW with warmup + cosine decay and global-norm clipping; returns (tx, schedule)."""
    t = cfg.train
    warmup = t.warmup or max(1, t.steps // 16)
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, warmup, max(t.steps, warmup + 1),
                                                  t.lr * t.min_lr_ratio)
    tx = optax.chain(optax.clip_by_global_norm(t.clip),
                     optax.adamw(schedule, b2=t.b2, weight_decay=t.weight_decay))
    return tx, schedule


def peak_tflops(cfg: Config) -> float | None:
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


@dataclasses.dataclass
class Run:
    cfg: Config
    mesh: Mesh
    rules: sharding.Rules
    model: model_lib.ModelFns
    data: ByteData | TokenDataset
    tx: optax.GradientTransformation
    schedule: Any
    zigzag: int
    diloco: StreamingDiLoCo | None = None
    islands: IslandsConfig | None = None  # this run is one island of several (diloco.islands)
    param_specs: Any = None
    logical: Any = None
    # metrics also carry the step's gradients tree (tests compare it with a reference);
    # set before the first step compiles
    report_grads: bool = False
    _compiled: dict = dataclasses.field(default_factory=dict)
    _stop_flags: dict = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, cfg: Config, devices=None) -> "Run":
        devices = list(devices) if devices is not None else jax.devices()
        cfg = resolve(cfg)  # model.vocab from the data
        validate(cfg, len(devices))
        mesh = make_mesh(MeshConfig(**dataclasses.asdict(cfg.mesh)), devices=devices)
        rules = model_lib.run_rules(cfg)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            model = model_lib.build(cfg, mesh, rules)
        try:
            data = open_data(cfg.data.path, seq_len=cfg.train.seq_len, seed=cfg.train.seed,
                             eval_fraction=cfg.data.eval_fraction,
                             separator=cfg.data.doc_separator.encode())
        except ValueError as e:  # validate checks sizes; a file that changed since is here
            raise ConfigError(f"data.path={cfg.data.path!r}: {e}") from None
        tx, schedule = inner_optimizer(cfg)
        # the sequence-parallel impls take tokens in the zigzag order over the ring axis
        zigzag = cfg.mesh.seq if cfg.attention.impl != "dense" else 1
        islands = islands_config(cfg.diloco.islands) if cfg.diloco.enabled else None
        return cls(cfg, mesh, rules, model, data, tx, schedule, zigzag, islands=islands)

    def scope(self):
        """The mesh and rules context every trace of the model needs."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def batch_rows(self) -> int:
        """Smallest batch the mesh can split: the size of the `batch` mesh axes."""
        return math.prod(self.mesh.shape[a] for a in sharding.mesh_axes("batch", self.rules))

    @property
    def num_replicas(self) -> int:
        return self.cfg.mesh.replica if self.cfg.diloco.enabled else 1

    def global_replicas(self) -> tuple[int, int]:
        """(this run's first global replica, replicas in all): island k of `count` holds the
        global replicas k·M..k·M+M−1 of count·M (M = mesh.replica); a single program 0..M−1."""
        M = self.num_replicas
        return (self.islands.id * M, self.islands.count * M) if self.islands else (0, M)

    # ------------------------------------------------------------------ data
    def _batch_spec(self, lead: int) -> P:
        batch = sharding.mesh_axes("batch", self.rules)
        act = sharding.mesh_axes("act_length", self.rules)
        entry = lambda axes: axes[0] if len(axes) == 1 else (axes or None)
        return P(*((None,) * lead), entry(batch), entry(act))

    def _place(self, arrays: dict, spec: P) -> dict:
        sh = NamedSharding(self.mesh, spec)
        # every process computes the whole (cheap) batch and places its own shards
        return {k: jax.make_array_from_callback(v.shape, sh, lambda i, v=v: v[i])
                for k, v in arrays.items()}

    def batch(self, step: int) -> dict:
        """Global batch for inner step `step` (counted from 1), packed and sharded; this
        process reads only the rows of its own shards (jaxpar.data.feed)."""
        B, N, M = self.cfg.train.batch_size, self.cfg.train.seq_len, self.num_replicas
        first, total = self.global_replicas()
        read = lambda ix, rows: self.data.train_rows(step, first + (ix[0] if ix else 0), rows,
                                                     B, total)
        if self.cfg.diloco.enabled:
            return self._feed(read, (M, B, N), P(sharding.REPLICA, *self._batch_spec(0)))
        return self._feed(read, (B, N), self._batch_spec(0))

    def eval_batches(self) -> dict:
        B, nb = self.cfg.train.batch_size, self.cfg.eval.batches
        read = lambda ix, rows: self.data.eval_rows(ix[0], rows, B, nb)
        return self._feed(read, (nb, B, self.cfg.train.seq_len), self._batch_spec(1))

    def _feed(self, read, shape, spec: P) -> dict:
        return feed.place(read, shape, NamedSharding(self.mesh, spec), zigzag=self.zigzag,
                          separator=self.cfg.data.doc_separator.encode())

    # ------------------------------------------------------------------ loss
    def loss(self, params, b: dict):
        logits = self.model.apply(params, b["tokens"], b["positions"], b["segment_ids"])
        return cross_entropy(logits, b["targets"])

    # ------------------------------------------------------------------ state
    def init_params(self):
        """Params created on their devices (jit with the rules' out shardings), or read there
        from `model.init_from`'s HF checkpoint (each device its own slices)."""
        dummy = jnp.zeros((self.batch_rows(), self.cfg.train.seq_len), jnp.int32)
        # model.init_from: the same placement, params read from the HF folder instead
        init = hf.loader(self.cfg.model.init_from) if self.cfg.model.init_from else None
        with self.scope():
            params, specs, logical = (init or sharding.init_sharded)(
                self.model.init, self.mesh, self.rules, jax.random.key(self.cfg.train.seed),
                dummy, dummy, dummy)
        self.param_specs, self.logical = specs, logical
        return params

    def init_state(self):
        params = self.init_params()
        if self.cfg.diloco.enabled:
            d = self.cfg.diloco
            outer = optax.sgd(d.outer_lr, momentum=d.outer_momentum or None,
                              nesterov=d.outer_momentum > 0)
            self.diloco = streaming_diloco(
                self.tx, num_replicas=self.num_replicas, sync_every=d.sync_every,
                num_fragments=d.num_fragments, overlap_steps=d.overlap_steps, alpha=d.alpha,
                outer_optimizer=outer, quantize=d.quantize, mesh=self.mesh,
                param_specs=self.param_specs)
            with self.scope():
                return self.diloco.init(params)
        with self.scope():
            opt_state = jax.jit(self.tx.init, out_shardings=self._opt_shardings(params))(params)
            step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(self.mesh, P()))
        return TrainState(step, params, opt_state)

    def _opt_shardings(self, params):
        """The optimizer state's shardings: moments like their params, counters replicated."""
        shardings = sharding.named(self.param_specs, self.mesh)
        abstract = jax.eval_shape(self.tx.init, params)
        return optax.tree_map_params(
            self.tx, lambda _, s: s, abstract, shardings,
            transform_non_params=lambda _: NamedSharding(self.mesh, P()),
            is_leaf=lambda x: isinstance(x, NamedSharding))

    def abstract_state(self):
        """`init_state`'s shapes, dtypes and shardings (ShapeDtypeStructs), nothing created:
        `compile_step(run.abstract_state(), batch)` plans the memory of a model that would
        not fit (scripts/bench_memory.py). Without DiLoCo."""
        if self.cfg.diloco.enabled:
            raise ValueError("abstract_state: not available with diloco.enabled")
        dummy = jax.ShapeDtypeStruct((self.batch_rows(), self.cfg.train.seq_len), jnp.int32)
        with self.scope():
            boxed = jax.eval_shape(self.model.init, jax.random.key(self.cfg.train.seed),
                                   dummy, dummy, dummy)
        self.logical = sharding.logical_axes(boxed)
        self.param_specs = sharding.mesh_specs(self.logical, self.rules)
        place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
        params = jax.tree.map(place, nn.unbox(boxed), sharding.named(self.param_specs,
                                                                     self.mesh))
        opt_state = jax.tree.map(place, jax.eval_shape(self.tx.init, params),
                                 self._opt_shardings(params))
        step = place(jax.ShapeDtypeStruct((), jnp.int32), NamedSharding(self.mesh, P()))
        return TrainState(step, params, opt_state)

    def param_table(self, params) -> list[dict]:
        return sharding.param_table(params, self.param_specs, self.logical, self.mesh)

    def eval_params(self, state):
        """The params to evaluate and sample: the global (outer) params with DiLoCo, after
        applying a merge that is still pending."""
        if self.diloco is None:
            return state.params
        fn = self._jit("finalize", lambda s: self.diloco.finalize(s).global_params)
        return fn(state)

    # ------------------------------------------------------------------ gradients
    def value_and_grad(self):
        """(params, batch) -> (loss, grads) of one step: the mean over train.microbatches
        microbatches; with DiLoCo vmapped over the replicas (per-replica losses and grads)."""
        keep = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh,
                                                                                 spec))
        spec_leaves = jax.tree.leaves(self.param_specs, is_leaf=lambda x: isinstance(x, P))

        def keep_grads(g):  # the fp32 accumulator sharded like the params (FSDP: 1/fsdp)
            leaves, treedef = jax.tree.flatten(g)
            return treedef.unflatten([keep(x, s) for x, s in zip(leaves, spec_leaves)])
        vg = microbatch.value_and_grad(
            self.loss, self.cfg.train.microbatches, constrain_grads=keep_grads,
            constrain_batch=lambda mb: jax.tree.map(lambda x: keep(x, self._batch_spec(0)), mb))
        if self.cfg.diloco.enabled:
            return jax.vmap(vg, spmd_axis_name=sharding.REPLICA)
        return vg

    def grads(self, params, b):
        """(loss, grads) of `value_and_grad` under jit, for tests and tools."""
        with self.scope():
            return self._jit("grads", self.value_and_grad())(params, b)

    # ------------------------------------------------------------------ steps
    def _jit(self, name, fn, **kw):
        if name not in self._compiled:
            self._compiled[name] = jax.jit(fn, **kw)
        return self._compiled[name]

    def _step_fn(self):
        grad = self.value_and_grad()
        if self.diloco is not None:
            # an island's rounds go through the store, on the host (jaxpar.train.island)
            update = self.diloco.inner_update if self.islands else self.diloco.update

            def step(state: DiLoCoState, b):
                loss_M, grads_M = grad(state.params, b)
                norm_M = jax.vmap(optax.tree.norm)(grads_M)
                lr = self.schedule(state.step)
                state = update(grads_M, state)
                metrics = {"loss": jnp.mean(loss_M), "grad_norm": jnp.mean(norm_M), "lr": lr}
                return state, {**metrics, "grads": grads_M} if self.report_grads else metrics
            return step

        def step(state: TrainState, b):
            loss, grads = grad(state.params, b)
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                       "lr": self.schedule(state.step)}
            if self.report_grads:
                metrics["grads"] = grads
            return TrainState(state.step + 1, params, opt_state), metrics
        return step

    def stop_flags(self, stop: bool) -> jax.Array:
        """One int per device, this process filling its own devices' entries with `stop`:
        the step reduces them, so a signal seen by any process stops every one."""
        if stop not in self._stop_flags:
            n = self.mesh.devices.size
            sh = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
            self._stop_flags[stop] = jax.make_array_from_callback(
                (n,), sh, lambda i: np.full((n,), int(stop), np.int32)[i])
        return self._stop_flags[stop]

    def compile_step(self, state, b):
        """Compile the train step once, ahead of time: the state keeps its shardings from
        step to step (so it never recompiles) and is donated."""
        if "train" not in self._compiled:
            shardings = jax.tree.map(lambda x: x.sharding, state)
            fn = jax.jit(faults.guard(self._step_fn()), donate_argnums=0,
                         out_shardings=(shardings, None))
            with self.scope():
                self._compiled["train"] = fn.lower(state, b, self.stop_flags(False)).compile()
        return self._compiled["train"]

    def train_step(self, state, b, stop: bool = False):
        """(state, metrics) of one step; `stop`: this process was asked to stop (the
        metrics' `stop` says whether any process was)."""
        return self.compile_step(state, b)(state, b, self.stop_flags(stop))

    def comm_bytes(self, state, b) -> dict[str, float]:
        """Bytes one device sends per train step, counted from the compiled HLO (a DiLoCo
        sync sits in a conditional, which the count weighs by its share of branches)."""
        return comm.bytes_by_kind(self.compile_step(state, b).as_text())

    def eval_loss(self, params, batches) -> jax.Array:
        def fn(p, bs):
            return jnp.mean(jax.lax.map(lambda b: self.loss(p, b), bs))
        with self.scope():
            return self._jit("eval", fn)(params, batches)

    def logits(self, params, tokens_BN, positions_BN, segment_ids_BN):
        with self.scope():
            return self._jit("logits", self.model.apply)(params, tokens_BN, positions_BN,
                                                         segment_ids_BN)

    # ------------------------------------------------------------------ accounting
    def flops_per_token(self, params) -> float:
        """Model FLOPs per trained token: 6·(non-embedding params) + causal attention
        6·layers·heads·head_dim·N (12·L·H·D·N halved by the mask)."""
        n = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                if "embed" not in jax.tree_util.keystr(p))
        c = self.cfg
        attn = 6 * c.model.layers * c.model.heads * head_dim(c) * c.train.seq_len
        return 6.0 * n + (attn if not c.model.module else 0)

    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.seq_len * self.num_replicas


def sample(run: Run, params, prompt: str, num_bytes: int, *, temperature: float = 0.0,
           seed: int = 0) -> str:
    """Continue `prompt` with the run's sharded model, one token per full-window forward
    (greedy at temperature 0), until the continuation decodes to `num_bytes` bytes (at most
    `num_bytes` tokens); encoded and decoded with the data's tokenizer (bytes for raw text)."""
    n = run.cfg.train.seq_len
    rows = run.batch_rows()
    tok = run.data.tokenizer
    ids = list(tok.encode(prompt))
    first = len(ids)
    rng = np.random.default_rng(seed)
    for _ in range(num_bytes):
        window = np.zeros((rows, n + 1), np.int32)
        ctx = ids[-n:]
        window[:, :len(ctx)] = ctx
        b = pack(window, separator=b"", zigzag=run.zigzag)
        placed = run._place({k: b[k] for k in ("tokens", "positions", "segment_ids")},
                            run._batch_spec(0))
        logits = run.logits(params, placed["tokens"], placed["positions"],
                            placed["segment_ids"])
        where = int(np.nonzero(b["positions"][0] == len(ctx) - 1)[0][0])
        row = np.asarray(jax.device_get(logits[0, where]), np.float64)
        if temperature > 0:
            p = np.exp((row - row.max()) / temperature)
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        else:
            nxt = int(row.argmax())
        ids.append(nxt)
        if len(tok.decode(ids[first:]).encode("utf-8")) >= num_bytes:
            break
    return tok.decode(ids)
