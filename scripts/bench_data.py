"""The data path, measured: prepare throughput, loader tokens/s against the trainer's need,
resident memory against dataset size, and bits per byte of bytes vs a 4k BPE.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_data.py \\
        [--sections format,prepare,loader,rss,bpb] [--bpb-steps 150] [--out docs/data_bench.json]

Writes the JSON (merged into an existing one section by section) and prints the tables.
The RSS datasets are synthetic: random uint16 tokens written straight to disk (no text is
tokenized), with a manifest like prepare's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxpar.bench import machine  # noqa: E402
from jaxpar.data import DEFAULT_CORPUS  # noqa: E402
from jaxpar.data import prepare as prep  # noqa: E402
from jaxpar.data.manifest import FORMAT  # noqa: E402

PY = sys.executable


def env8():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                XLA_FLAGS="--xla_force_host_platform_device_count=8")


# ----------------------------------------------------------------------------- prepare


def bench_prepare(work: Path, tok4k: Path) -> list[dict]:
    """MB/s of input text per tokenizer and worker count (the manifest's prepare_seconds:
    reading, tokenizing, writing; not the interpreter start). CLI in a fresh process."""
    text = work / "corpus_x4.txt"
    text.write_text(DEFAULT_CORPUS.read_text() * 4)
    mb = text.stat().st_size / 1e6
    rows = []
    for name, tok in (("bytes", "bytes"), ("bpe 4k (tokenizers)", str(tok4k))):
        for workers in (1, 2):
            out = work / f"prep_{workers}"
            subprocess.run([PY, "-m", "jaxpar.data.prepare", str(text), "--tokenizer", tok,
                            "--out", str(out), "--workers", str(workers), "--overwrite",
                            "--quiet"], check=True, env=env8())
            m = json.loads((out / "manifest.json").read_text())
            rows.append({"tokenizer": name, "workers": workers, "input_mb": mb,
                         "seconds": m["prepare_seconds"],
                         "mb_per_s": mb / m["prepare_seconds"], "tokens": m["tokens"]})
            print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- format


def bench_format(bpe: Path, n: int = 4000, seq_len: int = 128) -> dict:
    """Why flat token files: the same train split as ArrayRecord (one record per document,
    the default group size) vs the token file (memory-mapped, or pread as TokenWindows
    does); read `n` random windows of
    seq_len+1 tokens that may span documents, the access a packed-window loader makes."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    m = json.loads((bpe / "manifest.json").read_text())
    tokens = np.memmap(bpe / "train.bin", dtype=m["dtype"], mode="r")
    offsets = np.load(bpe / "train_docs.npy")
    path = bpe.parent / "train.array_record"
    w = ArrayRecordWriter(str(path), "")
    for a, b in zip(offsets[:-1], offsets[1:]):
        w.write(np.asarray(tokens[a:b]).tobytes())
    w.close()
    reader = ArrayRecordReader(str(path))
    starts = np.random.default_rng(0).integers(0, len(tokens) - seq_len - 1, n)

    def via_array_record(s):
        first = np.searchsorted(offsets, s, side="right") - 1
        last = np.searchsorted(offsets, s + seq_len + 1, side="left")
        recs = reader.read(list(range(first, last)))
        flat = np.frombuffer(b"".join(recs), dtype=m["dtype"])
        return flat[s - offsets[first]:s - offsets[first] + seq_len + 1]

    out = {"windows": n, "seq_len": seq_len, "flat_bytes": int(tokens.nbytes),
           "array_record_bytes": path.stat().st_size}
    fd, size = os.open(bpe / "train.bin", os.O_RDONLY), tokens.dtype.itemsize
    via_pread = lambda s: np.frombuffer(os.pread(fd, (seq_len + 1) * size, s * size),
                                        tokens.dtype)
    for name, fn in (("flat_memmap", lambda s: np.asarray(tokens[s:s + seq_len + 1])),
                     ("flat_pread", via_pread), ("array_record", via_array_record)):
        t0 = time.perf_counter()
        got = [fn(int(s)) for s in starts]
        out[f"{name}_windows_per_s"] = n / (time.perf_counter() - t0)
        out[f"{name}_check"] = int(sum(int(g.astype(np.int64).sum()) for g in got))
    assert out["flat_memmap_check"] == out["array_record_check"] == out["flat_pread_check"]
    os.close(fd)
    path.unlink()
    print(out, flush=True)
    return out


# ----------------------------------------------------------------------------- loader

LOADER_CODE = r"""
import json, sys, time
import jax, numpy as np
from jaxpar.train.config import load_config
from jaxpar.train.loop import Run
cfg_path, data, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config(cfg_path, [f"data.path={data}", "train.run_dir=/tmp/jaxpar_bench_data",
                             "model.vocab=0"])
run = Run.create(cfg, jax.devices()[:devices])
jax.block_until_ready(run.batch(1))
times = []
for step in range(2, 42):
    t0 = time.perf_counter()
    jax.block_until_ready(run.batch(step))
    times.append(time.perf_counter() - t0)
t = float(np.median(times))
print(json.dumps({"tokens_per_step": run.tokens_per_step(), "batch_s": t,
                  "tokens_per_s": run.tokens_per_step() / t, "shape": [
                      run.num_replicas, cfg.train.batch_size, cfg.train.seq_len],
                  "devices": devices}))
"""


def bench_loader(bpe: Path) -> list[dict]:
    """`Run.batch(step)` (read the rows, pack, zigzag, place on the devices) per process,
    median of 40 steps, against the trainer's consumption (docs/train_bench.json)."""
    train_bench = json.loads((ROOT / "docs/train_bench.json").read_text())
    demo_need = next(r["tokens_per_s"] for r in train_bench["rows"]
                     if r["layout"].startswith("demo"))
    fastest = max(r["tokens_per_s"] for r in train_bench["rows"])
    rows = []
    for name, cfg, devices, need in (("demo", "configs/demo.yaml", 8, demo_need),
                                     ("gpu_1", "configs/gpu_1.yaml", 1, None)):
        r = subprocess.run([PY, "-c", LOADER_CODE, str(ROOT / cfg), str(bpe), str(devices)],
                           check=True, capture_output=True, text=True, env=env8())
        rec = json.loads(r.stdout.strip().splitlines()[-1])
        rec.update(config=name, trainer_tokens_per_s=need,
                   ratio=rec["tokens_per_s"] / need if need else None)
        if name == "demo":
            rec["fastest_trainer_layout_tokens_per_s"] = fastest
        rows.append(rec)
        print(rec, flush=True)
    return rows


# ----------------------------------------------------------------------------- rss


def write_synthetic(out: Path, gigabytes: float, vocab: int = 4096, seed: int = 0) -> None:
    """A dataset folder of random uint16 tokens (documents of 50..5000 tokens), written in
    64 MiB chunks, with a manifest like prepare's."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    info = {}
    for name, n_tokens in (("train", int(gigabytes * 1e9 / 2)), ("eval", 1 << 20)):
        with open(out / f"{name}.bin", "wb") as f:
            left = n_tokens
            while left:
                n = min(left, 1 << 25)
                f.write(rng.integers(0, vocab, n, dtype=np.uint16).tobytes())
                left -= n
        lengths = rng.integers(50, 5000, n_tokens // 50 + 1)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        offsets = np.concatenate([starts[starts < n_tokens], [n_tokens]]).astype(np.int64)
        np.save(out / f"{name}_docs.npy", offsets)
        info[name] = {"tokens": n_tokens, "documents": len(offsets) - 1, "text_bytes": n_tokens}
    info["eval"]["decoded_bytes"] = info["eval"]["tokens"]
    (out / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "vocab_size": vocab, "dtype": "uint16",
        "tokenizer": {"kind": "synthetic", "file": None}, "splits": info,
        "tokens": sum(v["tokens"] for v in info.values()),
        "documents": sum(v["documents"] for v in info.values())}))


RSS_CODE = r"""
import json, sys, time
def rss():
    f = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    return {k: int(f[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
import numpy as np
from jaxpar.data.tokens import TokenDataset
base = rss()
t0 = time.perf_counter()
ds = TokenDataset(sys.argv[1], seq_len=128, seed=0)
open_s = time.perf_counter() - t0
after_open = rss()
t0 = time.perf_counter()
for step in range(1, 201):  # the demo's per-step rows: 2 replicas x 8 x 129 tokens
    for m in range(2):
        w, d = ds.train_rows(step, m, range(8), 8, 2)
read_s = time.perf_counter() - t0
print(json.dumps({"base_mb": base["VmRSS"], "open_s": open_s,
                  "after_open_mb": after_open["VmRSS"], "after_reads_mb": rss()["VmRSS"],
                  "peak_mb": rss()["VmHWM"], "read_200_steps_s": read_s}))
"""


def bench_rss(work: Path, sizes=(0.1, 1.0, 2.0)) -> list[dict]:
    """Resident memory of a process that opens the dataset and reads 200 steps of the
    demo's rows, above the same process after its imports (numpy, grain, jaxpar)."""
    rows = []
    for gb in sizes:
        out = work / f"synthetic_{gb}gb"
        t0 = time.perf_counter()
        write_synthetic(out, gb)
        write_s = time.perf_counter() - t0
        r = subprocess.run([PY, "-c", RSS_CODE, str(out)], check=True, capture_output=True,
                           text=True, env=env8())
        rec = json.loads(r.stdout.strip().splitlines()[-1])
        size = sum(p.stat().st_size for p in out.iterdir()) / 1e9
        rec.update(dataset_gb=size, write_s=write_s,
                   offsets_mb=(out / "train_docs.npy").stat().st_size / 2 ** 20,
                   data_path_mb=rec["after_reads_mb"] - rec["base_mb"])
        rows.append(rec)
        print(rec, flush=True)
        for p in out.iterdir():
            p.unlink()
        out.rmdir()
    return rows


# ----------------------------------------------------------------------------- bpb


def bench_bpb(work: Path, runs, steps: int) -> list[dict]:
    """The demo config (8 devices, DiLoCo + TokenRing + collective matmuls) for `steps`
    steps on the same documents as bytes and as a 4k BPE; eval on the same held-out
    documents, bits per byte from the decoded eval text."""
    rows = []
    for name, data in runs:
        run_dir = work / f"run_{name.replace(' ', '_')}_{steps}"
        t0 = time.perf_counter()
        r = subprocess.run([PY, "-m", "jaxpar.train", str(ROOT / "configs/demo.yaml"),
                            f"data.path={data}", f"train.run_dir={run_dir}",
                            f"train.steps={steps}", "checkpoint.every=0",
                            f"eval.every={min(50, steps // 2)}"],
                           capture_output=True, text=True, env=env8())
        wall = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr[-3000:]
        s = json.loads((run_dir / "summary.json").read_text())
        evals = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if "eval_loss" in ln]
        rows.append({"data": name, "steps": steps, "wall_s": wall,
                     "tokens_per_s": s["tokens_per_s"], "final_eval_loss": s["final_eval_loss"],
                     "final_eval_bpb": s["final_eval_bpb"], "params": s["params"],
                     "evals": [[e["step"], e["eval_bpb"]] for e in evals],
                     "sample": s["sample"]})
        print(rows[-1], flush=True)
    return rows


def table(rows, cols) -> str:
    head = "| " + " | ".join(c for c, _ in cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(f(r) for _, f in cols) + " |\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="format,prepare,loader,rss,bpb")
    ap.add_argument("--bpb-steps", type=int, default=150)
    ap.add_argument("--bpb-bpe-short-steps", type=int, default=40,
                    help="section bpb_bpe_short: BPE steps that fit the bytes run's wall time")
    ap.add_argument("--out", default=str(ROOT / "docs/data_bench.json"))
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    args = ap.parse_args()
    sections = args.sections.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="jaxpar_bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["info"] = {"machine": machine(), "note": "2-core x86_64 shared with other jobs: "
                      "timings are contended", "loadavg_at_start": os.getloadavg(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                    time.gmtime())}
    bpe, byt = work / "bpe4k", work / "bytes"
    if not bpe.exists():
        prep.prepare([DEFAULT_CORPUS], bpe, train_tokenizer=4096, progress=False)
    if not byt.exists():
        prep.prepare([DEFAULT_CORPUS], byt, tokenizer="bytes", progress=False)
    if "format" in sections:
        result["format"] = bench_format(bpe)
    if "prepare" in sections:
        result["prepare"] = bench_prepare(work, bpe / "tokenizer.json")
    if "loader" in sections:
        result["loader"] = bench_loader(bpe)
    if "rss" in sections:
        result["rss"] = bench_rss(work)
    if "bpb" in sections:
        result["bpb"] = bench_bpb(work, [("bytes", byt), ("bpe 4k", bpe)], args.bpb_steps)
    if "bpb_bpe_short" in sections:  # a BPE run whose wall time is near the bytes run's
        result["bpb_bpe_short"] = bench_bpb(work, [("bpe 4k", bpe)], args.bpb_bpe_short_steps)
    out.write_text(json.dumps(result, indent=1) + "\n")
    f1 = lambda k, fmt="{:.1f}": (lambda r: fmt.format(r[k]) if r.get(k) is not None else "—")
    if "prepare" in result:
        print(table(result["prepare"], [("tokenizer", lambda r: r["tokenizer"]),
                                        ("workers", f1("workers", "{}")),
                                        ("input MB", f1("input_mb")),
                                        ("s", f1("seconds", "{:.2f}")),
                                        ("MB/s", f1("mb_per_s", "{:.2f}"))]))
    if "loader" in result:
        print(table(result["loader"], [("config", lambda r: r["config"]),
                                       ("batch (M, B, N)", lambda r: str(tuple(r["shape"]))),
                                       ("ms / batch", lambda r: f"{1e3 * r['batch_s']:.1f}"),
                                       ("loader tokens/s", f1("tokens_per_s", "{:,.0f}")),
                                       ("trainer tokens/s", f1("trainer_tokens_per_s", "{:,.0f}")),
                                       ("ratio", f1("ratio", "{:.0f}×"))]))
    if "rss" in result:
        print(table(result["rss"], [("dataset GB", f1("dataset_gb", "{:.2f}")),
                                    ("open s", f1("open_s", "{:.3f}")),
                                    ("RSS after imports MB", f1("base_mb")),
                                    ("RSS after 200 steps MB", f1("after_reads_mb")),
                                    ("data path MB", f1("data_path_mb"))]))
    if "bpb" in result:
        print(table(result["bpb"] + result.get("bpb_bpe_short", []),
                    [("data", lambda r: r["data"]), ("steps", f1("steps", "{}")),
                                    ("wall s", f1("wall_s", "{:.0f}")),
                                    ("tokens/s", f1("tokens_per_s", "{:,.0f}")),
                                    ("eval bits/byte", f1("final_eval_bpb", "{:.3f}"))]))


if __name__ == "__main__":
    main()
