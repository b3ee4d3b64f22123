"""A served teacher against a local one and the top-k cache: seconds per optimizer step and bytes per token.

    .venv/bin/python benchmarks/served_teacher.py            # about 5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/served_teacher.py --small    # a quick pass

On a tiny pair written by `kdistill tiny` (vocabulary 4,096), the same `kd` run (forward KL, batch 16, 128 tokens)
is trained three ways for the same number of steps:

* **local**: the teacher model loaded next to the student (dense logits);
* **cache**: `kdistill cache` first (timed on its own), then training reads the stored top-k (k = 20);
* **served**: `kdistill serve-teacher` in another process on loopback, training asks it for the top-k (k = 20) of
  every batch (`teacher.server`), in requests of 8 sequences, 4 in flight.

Printed: seconds per step (train_runtime / steps, after one untimed warm-up step), the final kd loss, and the bytes
per trained token: of the answers on the wire (JSON as received, every position of every sequence; the served
answer also carries the positions that are not trained) and of the cache on disk. Everything runs on this machine's
CPU; with the teacher on a GPU server and the student elsewhere the ratio is what matters, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "alpaca_2000.jsonl"
K = 20


def kdistill(*args: str) -> None:
    print("$ kdistill " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "kdistill.cli", *args], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_config(pair: Path, out: Path, steps: int) -> dict:
    return {
        "student": {"name_or_path": str(pair / "student")},
        "data": {"train": str(DATA), "max_length": 128, "limit": 16 * (steps + 1)},
        "objectives": {"kd": {"weight": 1.0, "divergence": "forward_kl"}},
        "training": {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 16,
                     "learning_rate": 3e-3, "save_strategy": "no", "logging_steps": steps, "disable_tqdm": True,
                     "report_to": "none"},
        "seed": 0,
    }


def train(raw: dict, label: str) -> dict:
    """Train in this process (one warm-up step first, untimed); seconds per step, final loss, the trainer."""
    from kdistill.config import config_from_dict
    from kdistill.pipeline import prepare

    warm = json.loads(json.dumps(raw))
    warm["training"].update(max_steps=1, output_dir=raw["training"]["output_dir"] + "-warm")
    prepare(config_from_dict(warm)).trainer.train()
    prepared = prepare(config_from_dict(raw))
    trainer = prepared.trainer
    server = getattr(trainer.teacher, "server", None)
    if server is not None:
        server.count_bytes = True
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    steps = result.global_step
    out = {"label": label, "seconds_per_step": seconds / steps, "steps": steps, "loss": result.training_loss}
    if server is not None:
        tokens = trainer.teacher.trained_positions
        out.update(requests=server.requests, wire_bytes=server.response_bytes, trained_tokens=tokens,
                   wire_bytes_per_token=server.response_bytes / max(tokens, 1))
    print(f"{label}: {out['seconds_per_step']:.3f} s/step, loss {out['loss']:.4f}", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-served", help="output folder (relative paths: from here)")
    parser.add_argument("--small", action="store_true", help="fewer steps, smaller teacher")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    steps = 8 if args.small else 30
    pair = out / "pair"
    if not (pair / "tiny.json").is_file():
        kdistill("tiny", "--out", str(pair), "--kind", "causal", "--data", str(DATA), "--vocab-size", "4096",
                 "--teacher-hidden", "128" if not args.small else "96", "--teacher-layers", "4",
                 "--teacher-steps", "0", "--no-progress")
    results = []
    local = base_config(pair, out / "local", steps)
    local["teacher"] = {"name_or_path": str(pair / "teacher")}
    results.append(train(local, "local teacher"))

    cached = base_config(pair, out / "cached", steps)
    cached["teacher"] = {"name_or_path": str(pair / "teacher")}
    cached["cache"] = {"dir": str(out / "cache"), "k": K}
    cached["objectives"]["kd"]["missing"] = "bucket"
    from kdistill.config import config_from_dict
    from kdistill.recipes.lm import build_cache

    start = time.perf_counter()
    stats = build_cache(config_from_dict(cached), progress=False)["train"]
    cache_seconds = time.perf_counter() - start
    row = train(cached, f"top-{K} cache")
    row.update(cache_seconds=cache_seconds, disk_bytes_per_token=stats.get("bytes_per_token"))
    results.append(row)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "kdistill.cli", "serve-teacher", str(pair / "teacher"),
                               "--port", str(port), "--served-model-name", "teacher", "--max-logprobs", str(K)])
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("serve-teacher did not start") from None
                time.sleep(0.3)
        served = base_config(pair, out / "served", steps)
        served["teacher"] = {"server": {"url": url, "model": "teacher", "top_k": K}}
        served["objectives"]["kd"]["missing"] = "bucket"
        results.append(train(served, f"served top-{K}"))
    finally:
        server.terminate()
        server.wait(timeout=30)

    base = results[0]["seconds_per_step"]
    print("\n| teacher signal | s/step | vs local | final kd loss | bytes / trained token |")
    print("|---|---|---|---|---|")
    for r in results:
        size = (f"{r['wire_bytes_per_token']:,.0f} on the wire (JSON)" if "wire_bytes_per_token" in r else
                f"{r['disk_bytes_per_token']:.1f} on disk" if r.get("disk_bytes_per_token") else "none (in memory)")
        print(f"| {r['label']} | {r['seconds_per_step']:.3f} | {r['seconds_per_step'] / base:.2f}x | "
              f"{r['loss']:.4f} | {size} |")
    print(f"\ncache written in {cache_seconds:.1f} s; {steps} steps of 16 rows each")
    (out / "results.json").write_text(json.dumps({"steps": steps, "k": K, "results": results,
                                                  "cache_seconds": cache_seconds}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
