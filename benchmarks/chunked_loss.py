"""Dense vs chunked KD loss: forward+backward peak memory and wall time on CPU (float32).

Each variant runs in a fresh subprocess; peak memory is that process's ru_maxrss minus the ru_maxrss of a
baseline process that only allocates the same inputs (so the number is the loss's own forward+backward peak).

    .venv/bin/python benchmarks/chunked_loss.py                       # V=151936, H=896, N=1024 and 4096
    .venv/bin/python benchmarks/chunked_loss.py --tokens 256 --vocab 32000   # quick

Dense is skipped when its estimate (9 (N, V) float32 tensors; 8.3 were measured at N = 1,024) exceeds 90% of
MemAvailable, unless --force-dense is given (the child may then be killed for memory, which is reported).
Not a test: timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(variant: str, tokens: int, vocab: int, hidden: int, chunk_size: int, divergence: str) -> None:
    import torch

    from kdistill.losses import DIVERGENCES, chunked_distillation_loss

    torch.manual_seed(0)
    hs = (torch.randn(tokens, hidden) * 0.5).requires_grad_(True)
    ht = torch.randn(tokens, hidden) * 0.5
    ws = (torch.randn(vocab, hidden) * 0.02).requires_grad_(True)
    wt = torch.randn(vocab, hidden) * 0.02
    # Touch the gradient buffers a trainer would hold anyway so baseline and variants agree on them.
    hs.grad = torch.zeros_like(hs)
    ws.grad = torch.zeros_like(ws)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = 0.0
    loss = float("nan")
    if variant != "baseline":
        start = time.perf_counter()
        if variant == "dense":
            out = DIVERGENCES[divergence](hs @ ws.T, ht @ wt.T, None, 1.0, "mean", None)
        else:
            out = chunked_distillation_loss(hs, ws, ht, wt, divergence=divergence, chunk_size=chunk_size)
        out.backward()
        seconds = time.perf_counter() - start
        loss = out.item()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"maxrss_kb": peak, "before_kb": before, "seconds": seconds, "loss": loss,
                      "grad_norm": float(ws.grad.norm()) if variant != "baseline" else 0.0}))


def _run(variant, args, tokens):
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size), "--divergence", args.divergence]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--child", choices=["baseline", "dense", "chunked"])
    parser.add_argument("--force-dense", action="store_true", help="Run dense even above the memory estimate")
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.tokens[0], args.vocab, args.hidden, args.chunk_size, args.divergence)
        return
    import torch

    print(f"V={args.vocab} H={args.hidden} chunk_size={args.chunk_size} divergence={args.divergence} "
          f"float32 CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for tokens in args.tokens:
        base = _run("baseline", args, tokens)
        rows = {}
        dense_estimate = 9 * tokens * args.vocab * 4
        if dense_estimate > 0.9 * _mem_available_bytes() and not args.force_dense:
            rows["dense"] = {"error": f"skipped (estimated ~{dense_estimate / 2**30:.1f} GiB)"}
        else:
            rows["dense"] = _run("dense", args, tokens)
        rows["chunked"] = _run("chunked", args, tokens)
        print(f"\nN={tokens}  (baseline inputs: {base['maxrss_kb'] / 2**20:.2f} GiB rss)")
        for name, r in rows.items():
            if "error" in r:
                print(f"  {name:8s} {r['error']}")
                continue
            r["peak_gib"] = (r["maxrss_kb"] - base["maxrss_kb"]) / 2**20
            print(f"  {name:8s} peak +{r['peak_gib']:.2f} GiB  time {r['seconds']:.2f} s  loss {r['loss']:.6f}  "
                  f"|grad W_s| {r['grad_norm']:.6e}")
        d, c = rows["dense"], rows["chunked"]
        if "error" not in d and "error" not in c:
            print(f"  ratios: chunked/dense peak {c['peak_gib'] / d['peak_gib']:.3f}, "
                  f"time {c['seconds'] / d['seconds']:.3f}")


if __name__ == "__main__":
    main()
