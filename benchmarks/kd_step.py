"""Time per optimizer step: plain SFT vs KD with a live teacher vs KD from a top-k teacher cache (CPU, float32).

Target (issue): a KD step from the cache within 1.15x of a plain SFT step (kd_cache / sft <= 1.15).

Everything is built at run time, offline: a byte-level BPE tokenizer trained on the bundled Alpaca file, a
Qwen2-style student and a larger teacher sharing it (random weights: the step time does not depend on them), both
saved with save_pretrained. Each mode is a fresh `prepare(cfg)` + `trainer.train()` with
max_steps = warmup + steps, the same seed and the same data (the first (warmup + steps) * batch_size examples, in
the same shuffled order); a TrainerCallback times every optimizer step and the median of the measured ones is
reported, two ways:

    compute   on_step_begin -> on_step_end: forward(s), loss, backward, optimizer step
    interval  on_step_end -> next on_step_end: the above plus fetching the batch (collation, and for the cache
              modes reading and decoding the stored top-k records), i.e. what a training run really pays per step

Modes: sft (objective ce, no teacher), kd_online (ce 0.5 + kd 0.5, live teacher), kd_cache (ce 0.5 + kd 0.5
from a top-k cache written beforehand by `build_cache`, timed separately), kd_cache_only (kd 1 from the cache).

    .venv/bin/python benchmarks/kd_step.py                         # V~8192, student 256x4, teacher 512x8, batch 4: ~30 s idle, minutes on a busy CPU
    .venv/bin/python benchmarks/kd_step.py --steps 5 --warmup 2 --batch-size 4 --max-length 128   # quick

Not a test: timings on a shared 2-core machine are noisy; rerun on an otherwise idle machine before quoting them.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO / "examples" / "data" / "alpaca_2000.jsonl"
TARGET = 1.15


def build_models(work: Path, data: Path, vocab_size: int, student_hidden: int, student_layers: int,
                 teacher_hidden: int, teacher_layers: int, max_length: int) -> dict:
    """Tokenizer + student + teacher saved under `work`; returns paths and parameter counts."""
    from kdistill.apps.tiny import build_model, decoder_config, iter_text, train_tokenizer

    tokenizer = train_tokenizer(iter_text(data), vocab_size=vocab_size, kind="decoder")
    out = {"vocab": len(tokenizer)}
    specs = {"student": (student_hidden, student_layers, 1), "teacher": (teacher_hidden, teacher_layers, 0)}
    for role, (hidden, layers, seed) in specs.items():
        heads = max(hidden // 64, 1)
        config = decoder_config(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                num_kv_heads=max(heads // 2, 1), max_position_embeddings=max(512, max_length))
        model = build_model(config, seed=seed)
        path = work / role
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        total = sum(p.numel() for p in model.parameters())
        embed = model.get_input_embeddings().weight.numel()
        head = model.get_output_embeddings().weight
        tied = head.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        non_embedding = total - embed - (0 if tied else head.numel())
        out[role] = {"path": str(path), "params": total, "non_embedding": non_embedding,
                     "head": head.numel(), "hidden": hidden, "layers": layers, "heads": heads, "tied": tied}
        del model
    return out


def base_config(args, models: dict, work: Path, objectives: dict, teacher: bool, cache_dir: str | None) -> dict:
    cfg = {
        "student": {"name_or_path": models["student"]["path"], "dtype": "float32"},
        "data": {"train": str(args.data), "max_length": args.max_length, "skip_invalid": True,
                 "limit": (args.warmup + args.steps) * args.batch_size},
        "objectives": objectives,
        "training": {"output_dir": str(work / "out"), "max_steps": args.warmup + args.steps,
                     "per_device_train_batch_size": args.batch_size, "learning_rate": 1e-4,
                     "dataloader_num_workers": 0, "save_strategy": "no", "eval_strategy": "no",
                     "report_to": "none", "logging_steps": 10_000, "disable_tqdm": True},
        "seed": 0,
    }
    if teacher:
        cfg["teacher"] = {"name_or_path": models["teacher"]["path"], "dtype": "float32"}
    if cache_dir:
        cfg["cache"] = {"dir": cache_dir, "k": args.k, "temperature": 1.0, "logprob_bits": args.logprob_bits,
                        "batch_size": args.batch_size, "kl_sample_tokens": 2048}
    return cfg


def time_mode(raw: dict, warmup: int) -> dict:
    """Fresh prepare + train; per-step compute and interval times of the steps after `warmup`."""
    from transformers import TrainerCallback

    from kdistill.config import config_from_dict
    from kdistill.pipeline import prepare

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin = None
            self.last_end = None
            self.compute: list[float] = []
            self.interval: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.compute.append(now - self.begin)
            self.interval.append(now - self.last_end if self.last_end is not None else float("nan"))
            self.last_end = now

    timer = StepTimer()
    cfg = config_from_dict(raw, source="kd_step benchmark")
    prepared = prepare(cfg, callbacks=[timer])
    trainer = prepared.trainer
    chunk_size = trainer.chunk_size
    result = trainer.train()
    out = {
        "compute": statistics.median(timer.compute[warmup:]),
        "interval": statistics.median(timer.interval[warmup:]),
        "compute_all": timer.compute,
        "chunk_size": chunk_size,
        "teacher_loaded": prepared.teacher is not None,
        "steps": result.global_step,
        "loss": result.training_loss,
    }
    del prepared, trainer
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (>= 1)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--logprob-bits", type=int, default=12)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE target (the file may reach fewer)")
    parser.add_argument("--data", type=Path, default=ALPACA)
    parser.add_argument("--work", type=Path, default=None, help="keep models and cache here (default: temp dir)")
    parser.add_argument("--modes", nargs="+", default=["sft", "kd_online", "kd_cache", "kd_cache_only"],
                        choices=["sft", "kd_online", "kd_cache", "kd_cache_only"])
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step's interval has no previous step)")
    if not args.data.is_file():
        sys.exit(f"data file not found: {args.data}")

    import torch
    import transformers

    from kdistill.config import config_from_dict
    from kdistill.recipes.lm import build_cache

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="kd_step-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"float32 CPU")
    start = time.perf_counter()
    models = build_models(work, args.data, args.vocab_size, args.student_hidden, args.student_layers,
                          args.teacher_hidden, args.teacher_layers, args.max_length)
    s, t = models["student"], models["teacher"]
    print(f"tokenizer: BPE on {args.data.name}, asked {args.vocab_size}, got V={models['vocab']} "
          f"({time.perf_counter() - start:.1f} s incl. building the models)")
    for role, m in (("student", s), ("teacher", t)):
        print(f"{role}: qwen2 hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads, tied embeddings "
              f"{m['tied']}: N={m['params']:,} params, non-embedding {m['non_embedding']:,}")
    n_examples = (args.warmup + args.steps) * args.batch_size
    print(f"data: first {n_examples} examples of {args.data.name}, max_length {args.max_length}, batch "
          f"{args.batch_size}, {args.warmup} warmup + {args.steps} measured steps per mode, seed 0, no eval/saving")

    runs = {}
    cache_dir = str(work / f"cache-k{args.k}")
    for mode in args.modes:
        if mode == "sft":
            raw = base_config(args, models, work, {"ce": {"weight": 1.0}}, teacher=False, cache_dir=None)
        elif mode == "kd_online":
            raw = base_config(args, models, work, {"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}, teacher=True,
                              cache_dir=None)
        else:
            objectives = {"kd": {"weight": 1.0}} if mode == "kd_cache_only" else \
                {"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}
            raw = base_config(args, models, work, objectives, teacher=True, cache_dir=cache_dir)
            if not (Path(cache_dir) / "train" / "manifest.json").is_file():
                cache_start = time.perf_counter()
                stats = build_cache(config_from_dict(raw, source="kd_step benchmark"), progress=False)["train"]
                cache_seconds = time.perf_counter() - cache_start
                gc.collect()
                print(f"cache build (k={stats['k']}, {stats['logprob_bits']}-bit log-probs, {stats['id_bits']}-bit "
                      f"ids): {stats['examples']} examples, {stats['tokens']} tokens in {cache_seconds:.1f} s "
                      f"({1e3 * cache_seconds / max(stats['tokens'], 1):.2f} ms/token, includes loading the "
                      f"teacher); {stats['record_bytes_per_token']:.1f} record bytes/token, "
                      f"{stats['bytes_per_token']:.1f} bytes/token on disk incl. index + manifest; "
                      f"mean KL(full || top-k) {stats['kl_mean']:.4g} nats on {stats['kl_sample_tokens']} tokens")
        print(f"running {mode} ...", flush=True)
        runs[mode] = time_mode(raw, args.warmup)

    base = runs.get("sft")
    print(f"\nmedian seconds per optimizer step over {args.steps} steps (after {args.warmup} warmup):")
    print(f"  {'mode':14s} {'compute s':>10s} {'ratio':>7s} {'interval s':>11s} {'ratio':>7s}  loss path")
    for mode, r in runs.items():
        rc = r["compute"] / base["compute"] if base else float("nan")
        ri = r["interval"] / base["interval"] if base else float("nan")
        path = "dense logits" if r["chunk_size"] is None else f"chunked ({r['chunk_size']} positions)"
        teacher = ", live teacher" if r["teacher_loaded"] else ""
        print(f"  {mode:14s} {r['compute']:10.3f} {rc:7.3f} {r['interval']:11.3f} {ri:7.3f}  {path}{teacher}")
    print("  (compute: on_step_begin -> on_step_end; interval: on_step_end -> on_step_end, adds fetching and "
          "collating the batch, for the cache modes reading + decoding the top-k records)")
    print(f"  chunked losses need V >= chunked_loss.min_vocab (32768 by default); V={models['vocab']}")

    head_s, head_t = s["head"] if s["tied"] else 0, t["head"] if t["tied"] else 0
    print("\nFLOP bound on kd_online / sft, (6 N_s + 2 N_t) / (6 N_s), attention's T^2 term ignored:")
    print(f"  all parameters        N_s={s['params']:,} N_t={t['params']:,}: "
          f"{(6 * s['params'] + 2 * t['params']) / (6 * s['params']):.3f}")
    print(f"  non-embedding params  N_s={s['non_embedding']:,} N_t={t['non_embedding']:,}: "
          f"{(6 * s['non_embedding'] + 2 * t['non_embedding']) / (6 * s['non_embedding']):.3f}")
    ms, mt = s["non_embedding"] + head_s, t["non_embedding"] + head_t
    print(f"  matmul params (non-embedding + tied output layer, what a token actually multiplies) "
          f"N_s={ms:,} N_t={mt:,}: {(6 * ms + 2 * mt) / (6 * ms):.3f}")
    print("  kd_cache's FLOP bound is 1.0: no teacher forward, the top-k loss adds O(k) per token")

    if base and "kd_cache" in runs:
        for label, key in (("interval (per step, incl. data)", "interval"), ("compute (begin -> end)", "compute")):
            ratio = runs["kd_cache"][key] / base[key]
            print(f"target: kd_cache / sft <= {TARGET} ({label}): {ratio:.3f} -> "
                  f"{'PASS' if ratio <= TARGET else 'MISS'} in this run")
    else:
        print("target: kd_cache / sft <= 1.15: not measured (run both sft and kd_cache)")
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
