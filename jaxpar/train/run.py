"""`train(cfg)`: one config-driven run, from an empty (or existing) run folder to a summary.

The run folder gets: config.yaml (resolved), mesh.json, params.txt / params.json (the param
table), metrics.jsonl, checkpoints/, summary.json, and tb/ when tensorboardX is installed.
Running the same command on a folder that holds checkpoints resumes from the newest one:
the data order is a function of the step, so the resumed run sees the same batches.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxpar import sharding
from jaxpar.bench import machine
from jaxpar.monitor.steps import StepMonitor
from jaxpar.train import attention_choice
from jaxpar.train.checkpoint import Checkpointer, layout_meta
from jaxpar.train.config import Config, dump
from jaxpar.train.loop import Run, peak_tflops, sample
from jaxpar.train.metrics import MetricsWriter


def _write_run_files(run: Run, run_dir: Path, params) -> None:
    cfg = run.cfg
    (run_dir / "config.yaml").write_text(dump(cfg))
    mesh = {"axes": dict(run.mesh.shape), "devices": len(run.mesh.devices.flat),
            "processes": jax.process_count(), "machine": machine(),
            "rules": [[k, v] for k, v in run.rules]}
    (run_dir / "mesh.json").write_text(json.dumps(mesh, indent=1) + "\n")
    rows = run.param_table(params)
    (run_dir / "params.json").write_text(json.dumps(rows, indent=1) + "\n")
    (run_dir / "params.txt").write_text(sharding.format_table(rows) + "\n")


def train(cfg: Config, *, devices=None, quiet: bool = False) -> dict:
    """Run (or resume) the configured training; returns the summary dict."""
    lead = jax.process_index() == 0 and not quiet
    attention_choice.apply(cfg, lead)  # attention.impl=auto: print and record the pick
    run = Run.create(cfg, devices)
    cfg = run.cfg  # resolved (model.vocab from the data)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = run.init_state()
    params_for_table = run.eval_params(state) if run.diloco else state.params
    if lead:
        _write_run_files(run, run_dir, params_for_table)
    ckpt = Checkpointer(run_dir, cfg.checkpoint.keep)
    latest = ckpt.latest_step()  # step 0: a checkpoint written by `jaxpar-convert from-hf`
    start = latest or 0
    writer = MetricsWriter(run_dir, total_steps=cfg.train.steps, start_step=start, enabled=lead)
    if latest is not None:
        state, meta = ckpt.restore(start, state, expect=layout_meta(cfg))
        writer.print(f"resumed from {run_dir}/checkpoints step {start} "
                     f"(data position: step {meta['data_step']})")
    else:
        writer.print(f"mesh {dict(run.mesh.shape)} on {machine()}")
        if lead:
            writer.print(sharding.format_table(run.param_table(params_for_table)))

    b = run.batch(start + 1)
    comm_bytes = run.comm_bytes(state, b)
    flops_tok = run.flops_per_token(params_for_table)
    peak = peak_tflops(cfg)
    n_dev = len(run.mesh.devices.flat)
    evals = run.eval_batches()
    history, evals_seen = [], []
    busy, last_t, last_step = 0.0, time.perf_counter(), start
    steps = cfg.train.steps
    with StepMonitor.for_run(run, run_dir, start) as monitor:
        for step in range(start + 1, steps + 1):
            state, m = run.train_step(state, b)
            if step < steps:
                b = run.batch(step + 1)  # built on the host while the device runs this step
            m = monitor.step(step, m)  # waits for the step: times, heartbeat, straggler warnings
            if step % cfg.train.log_every == 0 or step == steps or step == start + 1:
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                now = time.perf_counter()
                dt = now - last_t - busy
                rec = {"step": step, **m}
                if step > start + 1:  # the first step includes compilation
                    tok_s = run.tokens_per_step() * (step - last_step) / dt
                    rec.update(tokens_per_s=tok_s, tflops=flops_tok * tok_s / 1e12)
                    if peak:
                        rec["mfu"] = rec["tflops"] / (peak * n_dev)
                rec["comm_bytes"] = sum(comm_bytes.values())
                writer.write(rec)
                writer.progress(step, rec)
                history.append(rec)
                busy, last_t, last_step = 0.0, time.perf_counter(), step
            t0 = time.perf_counter()
            if (cfg.eval.every and step % cfg.eval.every == 0) or step == steps:
                loss = float(run.eval_loss(run.eval_params(state), evals))
                writer.write({"step": step, "eval_loss": loss,
                              "eval_bpb": run.data.bits_per_byte(loss)})
                evals_seen.append([step, loss])
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == steps:
                ckpt.save(step, state, {"data_step": step, "seed": cfg.train.seed,
                                        **layout_meta(cfg)})
            busy += time.perf_counter() - t0
    ckpt.wait()
    ckpt.close()

    final_params = run.eval_params(state)
    # the loop evaluates the last step; a finished run started again evaluates here
    final_eval = (evals_seen[-1][1] if evals_seen
                  else float(run.eval_loss(final_params, evals)))
    text = ""
    if cfg.eval.sample_bytes:
        text = sample(run, final_params, cfg.eval.prompt, cfg.eval.sample_bytes)
    rates = [r["tokens_per_s"] for r in history if "tokens_per_s" in r]
    summary = {
        "steps": steps, "final_eval_loss": final_eval,
        "final_eval_bpb": run.data.bits_per_byte(final_eval),
        "tokens_per_s": float(np.median(rates)) if rates else None,
        "step_time_s": run.tokens_per_step() / float(np.median(rates)) if rates else None,
        "evals": evals_seen,  # [step, eval loss] of this process's run (after a resume: since)
        "comm_bytes_per_step": comm_bytes, "flops_per_token": flops_tok,
        "params": int(sum(x.size for x in jax.tree.leaves(final_params))),
        "sample": text, "machine": machine(),
        "config": dataclasses.asdict(cfg),
    }
    if run.diloco is not None:
        summary["diloco_bytes"] = run.diloco.bytes_report(final_params, steps)
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        writer.print(f"done: eval loss {final_eval:.4f} ({summary['final_eval_bpb']:.3f} bits/byte)"
                     + (f", {summary['tokens_per_s']:.0f} tokens/s" if rates else ""))
        if text:
            writer.print(f"sample: {text!r}")
    writer.close()
    return summary
