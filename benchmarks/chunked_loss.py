"""Dense vs chunked KD loss (vs TRL's chunked divergence when trl is installed): forward+backward peak memory
and wall time on CPU (float32).

Each variant runs in a fresh subprocess; peak memory is that process's ru_maxrss minus the ru_maxrss of a
baseline process that only allocates the same inputs (so the number is the loss's own forward+backward peak).
`trl` is TRL's `ChunkedDivergenceFunction` (the DistillationTrainer's loss: tiles of 4,096 tokens x 32,768
vocabulary entries, online log-sum-exp; beta 0 = forward KL) on the same inputs; `pip install -e '.[bench]'`.

    .venv/bin/python benchmarks/chunked_loss.py --force-dense   # V=151936, H_s=896, H_t=1536, N=1024 and 4096
    .venv/bin/python benchmarks/chunked_loss.py --tokens 2048 --teacher-hidden 896   # the TRL comparison
    .venv/bin/python benchmarks/chunked_loss.py --tokens 256 --vocab 32000   # quick

Dense is skipped when its estimate (9 (N, V) float32 tensors; 8.3 were measured at N = 1,024) exceeds 90% of
MemAvailable, unless --force-dense is given (the child may then be killed for memory, which is reported).
Not a test: timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _child(variant: str, tokens: int, vocab: int, hidden: int, teacher_hidden: int, chunk_size: str,
           divergence: str) -> None:
    import torch

    from kdistill.losses import DIVERGENCES, chunked_distillation_loss

    torch.manual_seed(0)
    hs = (torch.randn(tokens, hidden) * 0.5).requires_grad_(True)
    ht = torch.randn(tokens, teacher_hidden) * 0.5
    ws = (torch.randn(vocab, hidden) * 0.02).requires_grad_(True)
    wt = torch.randn(vocab, teacher_hidden) * 0.02
    if variant == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
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
        elif variant == "trl":
            per_token, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, 0.0, 1.0)
            out = per_token.mean()
        else:
            size = chunk_size if chunk_size == "auto" else int(chunk_size)
            out = chunked_distillation_loss(hs, ws, ht, wt, divergence=divergence, chunk_size=size)
        out.backward()
        seconds = time.perf_counter() - start
        loss = out.item()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"maxrss_kb": peak, "before_kb": before, "seconds": seconds, "loss": loss,
                      "grad_norm": float(ws.grad.norm()) if variant != "baseline" else 0.0}))


def _run(variant, args, tokens):
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden), "--chunk-size",
           str(args.chunk_size), "--divergence", args.divergence]
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
    parser.add_argument("--hidden", type=int, default=896, help="student hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=1536)
    parser.add_argument("--chunk-size", default="auto", help="rows per chunk, or auto (the default, as in training)")
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--child", choices=["baseline", "dense", "chunked", "trl"])
    parser.add_argument("--no-trl", action="store_true", help="Skip TRL even when it is installed")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (in alternation); time = median")
    parser.add_argument("--force-dense", action="store_true", help="Run dense even above the memory estimate")
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.tokens[0], args.vocab, args.hidden, args.teacher_hidden, args.chunk_size,
               args.divergence)
        return
    import importlib.metadata
    import importlib.util

    import torch

    from kdistill.losses.chunked import auto_chunk_size

    trl = importlib.util.find_spec("trl") is not None and not args.no_trl and args.divergence == "forward_kl"
    rows = (auto_chunk_size(args.vocab, args.hidden + args.teacher_hidden) if args.chunk_size == "auto"
            else int(args.chunk_size))
    print(f"V={args.vocab} H_s={args.hidden} H_t={args.teacher_hidden} chunk_size={args.chunk_size} ({rows} rows) "
          f"divergence={args.divergence} float32 CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", trl {importlib.metadata.version('trl')}" if trl else ", trl not run"))
    for tokens in args.tokens:
        base = _run("baseline", args, tokens)
        variants = ["dense", "chunked"] + (["trl"] if trl else [])
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        dense_estimate = 9 * tokens * args.vocab * 4
        skip = {}
        if dense_estimate > 0.9 * _mem_available_bytes() and not args.force_dense:
            skip["dense"] = f"skipped (estimated ~{dense_estimate / 2**30:.1f} GiB)"
        for _ in range(args.repeat):  # variants in alternation, so machine drift spreads over all of them
            for name in variants:
                if name not in skip:
                    runs[name].append(_run(name, args, tokens))
        print(f"\nN={tokens}  (baseline inputs: {base['maxrss_kb'] / 2**20:.2f} GiB rss; median of {args.repeat} "
              f"alternating runs)")
        rows = {}
        for name in variants:
            failed = [r["error"] for r in runs[name] if "error" in r]
            if name in skip or failed:
                print(f"  {name:8s} {skip.get(name) or failed[0]}")
                continue
            times = sorted(r["seconds"] for r in runs[name])
            r = dict(runs[name][0], seconds=statistics.median(times),
                     peak_gib=max(x["maxrss_kb"] for x in runs[name]) / 2**20 - base["maxrss_kb"] / 2**20)
            rows[name] = r
            print(f"  {name:8s} peak +{r['peak_gib']:.2f} GiB  time {r['seconds']:.2f} s "
                  f"(runs: {', '.join(f'{t:.1f}' for t in times)})  loss {r['loss']:.6f}  "
                  f"|grad W_s| {r['grad_norm']:.6e}")
        c = rows.get("chunked")
        for other in ("dense", "trl"):
            o = rows.get(other)
            if o is not None and c is not None:
                print(f"  ratios: chunked/{other} peak {c['peak_gib'] / o['peak_gib']:.3f}, "
                      f"time {c['seconds'] / o['seconds']:.3f}")

if __name__ == "__main__":
    main()
