"""`train(cfg)`: one config-driven run, from an empty (or existing) run folder to a summary.

The run folder gets: config.yaml (resolved), mesh.json, params.txt / params.json (the param
table), metrics.jsonl, checkpoints/, summary.json, goodput.json (and goodput/, one account
per start), heartbeats/ and steps/ (per process), and tb/ when tensorboardX is installed.
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
from jaxpar.monitor.watchdog import Watchdog
from jaxpar.train import attention_choice, faults, island, runfolder
from jaxpar.train.checkpoint import Checkpointer, layout_meta
from jaxpar.train.goodput import Goodput, format_line, summarize
from jaxpar.train.profile import Profiler
from jaxpar.train.config import Config
from jaxpar.train.loop import Run, peak_tflops, sample
from jaxpar.train.metrics import MetricsWriter, StepRate


def _floats(m: dict) -> dict:
    return {k: (int(v) if k == "nonfinite" else float(v)) for k, v in jax.device_get(m).items()}


def _write_run_files(run: Run, run_dir: Path, params) -> None:
    mesh = {"axes": dict(run.mesh.shape), "devices": len(run.mesh.devices.flat),
            "processes": jax.process_count(), "machine": machine(),
            "rules": [[k, v] for k, v in run.rules]}
    (run_dir / "mesh.json").write_text(json.dumps(mesh, indent=1) + "\n")
    rows = run.param_table(params)
    (run_dir / "params.json").write_text(json.dumps(rows, indent=1) + "\n")
    (run_dir / "params.txt").write_text(sharding.format_table(rows) + "\n")


def train(cfg: Config, *, devices=None, quiet: bool = False, started: float | None = None) -> dict:
    """Run (or resume) the configured training; returns the summary dict (or, when a signal
    stopped it, `{"preempted_at": step, ...}`). `started`: when this process started
    (`python -m jaxpar.train` passes it; goodput counts from there), default now."""
    t = cfg.train
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # from the first moment: a signal before the first step stops after it, with a
    # checkpoint; a peer that stops during restore or compile ends the group
    with (faults.Preemption() as preempt,
          Watchdog(run_dir, jax.process_index(), t.hang_timeout_s,
                   startup_s=t.startup_timeout_s) as watchdog):
        return _train(cfg, run_dir, preempt, watchdog, devices=devices, quiet=quiet,
                      started=time.time() if started is None else started)


def _train(cfg: Config, run_dir: Path, preempt, watchdog, *, devices, quiet, started) -> dict:
    lead = jax.process_index() == 0 and not quiet
    say = (lambda msg: print(msg, flush=True)) if lead else (lambda msg: None)
    attention_choice.apply(cfg, lead)  # attention.impl=auto: print and record the pick
    run = Run.create(cfg, devices)
    cfg = run.cfg  # resolved (model.vocab from the data)
    goodput = Goodput(run_dir, started=started, enabled=jax.process_index() == 0)
    ckpt = Checkpointer(run_dir, cfg.checkpoint.keep)
    if not ckpt.steps():
        runfolder.check_fresh(run_dir, cfg)
    diff = {}
    fresh = run.init_state()
    isl = island.for_run(run)  # diloco.islands: this run is one island of several
    goodput.add("startup", time.time() - started)
    with goodput.timed("restore"):  # the newest checkpoint every process can read
        start, state, meta = ckpt.restore_newest(
            fresh, say,
            lambda s, m: diff.update(runfolder.check_resume(run_dir, s, m, cfg)),
            expect=layout_meta(cfg))
    offset = meta["data_step"] - start if meta else 0  # batches skipped by rollbacks
    redo_eval = bool(meta and meta.get("eval_due"))  # its eval may not have been written
    params_for_table = run.eval_params(state) if run.diloco else state.params
    if lead:
        runfolder.record(run_dir, cfg, start, diff)
        _write_run_files(run, run_dir, params_for_table)
    writer = MetricsWriter(run_dir, total_steps=cfg.train.steps, start_step=start,
                           enabled=lead, redo_eval=redo_eval, wandb=cfg.metrics.wandb,
                           config=cfg.to_dict())
    if start:
        writer.print(f"resumed from {run_dir}/checkpoints step {start} "
                     f"(data position: step {start + offset})")
        if diff:
            writer.print(f"changed since that checkpoint: {runfolder.describe(diff)} (allowed: "
                         f"they do not change the math; see {runfolder.HISTORY})")
    else:
        writer.print(f"mesh {dict(run.mesh.shape)} on {machine()}")
        if lead:
            writer.print(sharding.format_table(run.param_table(params_for_table)))
    warn_grace(run_dir, cfg, writer.print)

    b = run.batch(start + 1 + offset)
    with goodput.timed("compile"):
        comm_bytes = run.comm_bytes(state, b)  # compiles the train step
    # compiled first: a rejoining island is ready to train when it announces itself
    state, joined = isl.join(state, start, meta, writer)
    if joined != start:  # adopted the store's newer state: its data step follows
        start = joined
        b = run.batch(start + 1 + offset)
    flops_tok = run.flops_per_token(params_for_table)
    peak = peak_tflops(cfg)
    n_dev = len(run.mesh.devices.flat)
    evals = run.eval_batches()
    history, evals_seen = [], []
    rate, guard = StepRate(), faults.NonFinite(cfg.train.nonfinite)
    steps, step = cfg.train.steps, start
    eval_due = lambda s: bool(cfg.eval.every and s % cfg.eval.every == 0) or s == steps
    # every checkpoint says whether its step's eval was due: a resume from it evaluates
    # that step again (the eval runs after the save, so a kill or a stop can come between)
    meta_of = lambda s, offset: {"data_step": s + offset, "seed": cfg.train.seed,
                                 "eval_due": eval_due(s), "config": cfg.to_dict(),
                                 **layout_meta(cfg), **isl.meta()}

    def evaluate(s):
        with goodput.timed("eval"):
            loss = float(run.eval_loss(run.eval_params(state), evals))
        writer.write({"step": s, "eval_loss": loss, "eval_bpb": run.data.bits_per_byte(loss)})
        evals_seen.append([s, loss])
    if redo_eval:
        evaluate(start)
    with (StepMonitor.for_run(run, run_dir, start, watchdog) as monitor,
          Profiler(cfg.train.profile, run_dir, say, start_step=start) as profiler):
        while step < steps:
            step += 1
            t0 = time.perf_counter()
            profiler.before(step)  # train.profile: a trace of the configured steps
            state, m = run.train_step(state, b, stop=preempt.signal is not None)
            if step < steps:
                b = run.batch(step + 1 + offset)  # built on the host while the device runs
            m = monitor.step(step, m)  # waits for the step: times, heartbeat, straggler warnings
            profiler.after(step)
            stop, bad = int(m.pop("stop")), int(m["nonfinite"])  # the same on every process
            dt = time.perf_counter() - t0
            rate.add(dt, timed=step > start + 1)  # 1st: warm-up
            goodput.step(step, dt)
            if bad:
                back = guard.handle(step, m, state, offset, run=run, ckpt=ckpt, writer=writer,
                                    meta_of=meta_of, say=say)
                if back:  # a rollback: go on from the checkpoint it restored
                    step, state, offset = back
                    history = [h for h in history if h["step"] <= step]
                    evals_seen = [e for e in evals_seen if e[0] <= step]
                    b = run.batch(step + 1 + offset)
                    continue
            with goodput.timed("island_sync"):
                state = isl.after_step(state, step)  # an island's sync / merge of this step
            if step % cfg.train.log_every == 0 or step == steps or step == start + 1:
                rec = {"step": step, **_floats(m), "comm_bytes": sum(comm_bytes.values())}
                tok_s = rate.take(run.tokens_per_step())
                if tok_s:
                    rec.update(tokens_per_s=tok_s, tflops=flops_tok * tok_s / 1e12)
                    if peak:
                        rec["mfu"] = rec["tflops"] / (peak * n_dev)
                writer.write(rec)
                writer.progress(step, rec)
                history.append(rec)
                goodput.write()
            if stop and step < steps:  # a signal to any process: all stop after this step
                preempt.agreed()
                isl.close()
                return _stop(step, state, meta_of(step, offset), preempt, ckpt, writer,
                             goodput, run_dir, say)
            # save before eval: the checkpoint's commit does not wait for eval (or its compile)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == steps:
                with goodput.timed("checkpoint"):
                    ckpt.save(step, state, meta_of(step, offset))
            if eval_due(step):
                evaluate(step)
    with goodput.timed("checkpoint"):
        ckpt.wait()
        ckpt.close()
    isl.close()

    final_params = run.eval_params(state)
    # the loop evaluates the last step; a finished run started again evaluates here
    final_eval = (evals_seen[-1][1] if evals_seen
                  else float(run.eval_loss(final_params, evals)))
    text = ""
    if cfg.eval.sample_bytes:
        text = sample(run, final_params, cfg.eval.prompt, cfg.eval.sample_bytes)
    rates = [r["tokens_per_s"] for r in history if "tokens_per_s" in r]
    goodput.write()
    summary = {
        "steps": steps, "nonfinite_steps": guard.count, "rollbacks": guard.rollbacks,
        "final_eval_loss": final_eval, "final_eval_bpb": run.data.bits_per_byte(final_eval),
        "tokens_per_s": float(np.median(rates)) if rates else None,
        "step_time_s": run.tokens_per_step() / float(np.median(rates)) if rates else None,
        "evals": evals_seen,  # [step, eval loss] of this process's run (after a resume: since)
        "comm_bytes_per_step": comm_bytes, "flops_per_token": flops_tok,
        "params": int(sum(x.size for x in jax.tree.leaves(final_params))),
        "sample": text, "machine": machine(), "goodput": summarize(run_dir),
        "config": dataclasses.asdict(cfg), **isl.summary(),
    }
    if run.diloco is not None:
        summary["diloco_bytes"] = run.diloco.bytes_report(final_params, steps)
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        writer.print(f"done: eval loss {final_eval:.4f} ({summary['final_eval_bpb']:.3f} bits/byte)"
                     + (f", {summary['tokens_per_s']:.0f} tokens/s" if rates else ""))
        if text:
            writer.print(f"sample: {text!r}")
        if summary["goodput"]:
            writer.print(format_line(summary["goodput"]))
    writer.close()
    return summary


PREEMPT_FILE = "preemption.json"  # the last stop's timing, read by `warn_grace`


def _stop(step, state, meta, preempt, ckpt, writer, goodput, run_dir: Path, say) -> dict:
    """Save `step` (agreed by the group), wait for the commit, say how long it took."""
    with goodput.timed("checkpoint"):
        ckpt.save(step, state, meta)
        ckpt.wait()
    took = time.monotonic() - preempt.at
    say(f"{preempt.signal}: stopped after step {step} with a checkpoint of it, {took:.1f} s "
        f"after the signal; the same command resumes")
    if jax.process_index() == 0:
        (run_dir / PREEMPT_FILE).write_text(json.dumps(
            {"step": step, "signal": preempt.signal, "signal_to_commit_s": took}) + "\n")
    goodput.write()
    ckpt.close(), writer.close()
    return {"preempted_at": step, "signal": preempt.signal, "signal_to_commit_s": took}


def warn_grace(run_dir: Path, cfg: Config, say) -> None:
    """One line at start-up when this run's last stop took longer than the grace period."""
    try:
        last = json.loads((run_dir / PREEMPT_FILE).read_text())
    except (OSError, ValueError):
        return
    if last["signal_to_commit_s"] > cfg.train.preempt_grace_s:
        say(f"warning: the last stop (step {last['step']}) took {last['signal_to_commit_s']:.1f}"
            f" s from the signal to the committed checkpoint, more than "
            f"train.preempt_grace_s={cfg.train.preempt_grace_s:g}: a scheduler would have "
            f"killed it first; save less state or ask the scheduler for a longer grace period")
