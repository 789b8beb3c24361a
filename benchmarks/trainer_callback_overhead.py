"""Overhead of capturing per-example gradients inside a Hugging Face `Trainer`, measured in one run.

    .venv/bin/python benchmarks/trainer_callback_overhead.py [--people 16] [--epochs 20] [--rank 16] [--json F]

Two fresh subprocesses train the same tiny Llama on the same data with the same seed
(`examples/hf_trainer_callback.py`): a plain `Trainer`, and the `CapturingTrainer` capturing *every* step
(``--capture-epochs`` = all epochs; the worst case) and writing the store at the end. Each reports the wall
time of the whole ``train`` call (model build, Trainer set-up, training, and for the capture run
``finalize``, also reported alone as ``finalize_s``), with dataworth imported before the clock starts in
both; the printed ratio is capture ÷ plain. Threads: ``BENCH_THREADS`` (default: torch's).
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

ROOT = Path(__file__).resolve().parent.parent
CHILD = "--child"


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    sys.path.insert(0, str(ROOT / "examples"))
    import custom_loop_lm
    import hf_trainer_callback

    import dataworth.gradients.watch  # noqa: F401 - imported before timing in both modes: imports are not training
    import dataworth.model.load  # noqa: F401
    import dataworth.store.writer  # noqa: F401

    docs, _, _ = custom_loop_lm.corpus(args.people)
    capture = args.epochs if args.mode == "capture" else 0
    timings: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        _, store = hf_trainer_callback.train(docs, epochs=args.epochs, capture_epochs=capture, rank=args.rank,
                                             work_dir=Path(tmp), timings=timings)
        seconds = time.perf_counter() - started
        rows = len(store) if store is not None else 0
    steps = args.epochs * -(-len(docs) // 4) // 2  # micro-batches of 4, accumulation 2 (the example's defaults)
    print(json.dumps({"mode": args.mode, "seconds": seconds, "rows": rows, "optimizer_steps": steps,
                      "finalize_s": timings.get("finalize_s", 0.0)}))


def run(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, CHILD, "--mode", mode, "--people", str(args.people), "--epochs",
           str(args.epochs), "--rank", str(args.rank)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("plain", "capture"), default="plain", help=argparse.SUPPRESS)
    p.add_argument("--people", type=int, default=16, help="2 documents per person")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return {}
    plain, capture = run("plain", args), run("capture", args)
    figures = {
        "plain_s": round(plain["seconds"], 3),
        "capture_s": round(capture["seconds"], 3),
        "time_ratio": round(capture["seconds"] / plain["seconds"], 3),
        "finalize_s": round(capture["finalize_s"], 3),
        "rows": capture["rows"],
        "optimizer_steps": plain["optimizer_steps"],
        "threads": os.environ.get("BENCH_THREADS", "torch default"),
    }
    print(f"Trainer, {2 * args.people} documents x {args.epochs} epochs, capture every step at rank {args.rank}: "
          f"plain {figures['plain_s']:.2f} s, capture {figures['capture_s']:.2f} s, "
          f"time_ratio {figures['time_ratio']:.3f} (of which writing the store {figures['finalize_s']:.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
