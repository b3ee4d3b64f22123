"""Memory per process: data parallel (ddp) vs FSDP2 sharding (fsdp) of the student and a live teacher, 2 processes.

Everything is built at run time, offline: a byte-level BPE tokenizer trained on the bundled Alpaca file, a
Qwen2-style teacher and a smaller student sharing it (random weights; the output layer padded to --vocab rows so it
weighs what a real LM's does), both saved with save_pretrained. Each strategy is one real `kdistill train` started
with `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo), ce 0.5 + kd 0.5 with chunked losses, the
same config except `distributed.strategy`. At the end of the last optimizer step every process reports:

    teacher      bytes of the teacher's weights this process holds (its shards under fsdp)
    student      bytes of the student's weights + gradients (before the optimizer step) + Adam state this process
                 holds (its shards under fsdp)
    peak RSS     the process's peak resident memory (VmHWM, /proc/self/status; torch has no CPU peak counter). It
                 includes loading: every process reads both models whole before sharding them
    RSS at end   resident memory at the end of the last step (VmRSS)

    .venv/bin/python benchmarks/fsdp_memory.py                     # teacher 1536x16 (~0.4B), student 768x8
    .venv/bin/python benchmarks/fsdp_memory.py --small             # a quick check of the script (tiny models)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO / "examples" / "data" / "alpaca_2000.jsonl"
MIB = 2 ** 20


def build_models(work: Path, args) -> dict:
    from kdistill.apps.tiny import build_model, decoder_config, iter_text, train_tokenizer

    tokenizer = train_tokenizer(iter_text(ALPACA), vocab_size=4096, kind="decoder")
    out = {}
    for role, hidden, layers, seed in (("teacher", args.teacher_hidden, args.teacher_layers, 0),
                                       ("student", args.student_hidden, args.student_layers, 1)):
        heads = max(hidden // 64, 1)
        config = decoder_config(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                num_kv_heads=max(heads // 2, 1), vocab_size=args.vocab)
        model = build_model(config, seed=seed)
        model.save_pretrained(work / role)
        tokenizer.save_pretrained(work / role)
        out[role] = {"path": str(work / role), "parameters": sum(p.numel() for p in model.parameters())}
        del model
    return out


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _local_bytes(tensor) -> int:
    from torch.distributed.tensor import DTensor

    if tensor is None:
        return 0
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def worker(config: str, out: str) -> None:
    """One process of a launched run: train, then write this process's figures to out/rank<N>.json."""
    import torch
    from transformers import TrainerCallback

    from kdistill.config import load_config
    from kdistill.pipeline import prepare

    class Measure(TrainerCallback):
        grad_bytes = 0

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            # the gradients exist between backward and the optimizer step (zeroed, set to None, before step end)
            self.grad_bytes = sum(_local_bytes(p.grad) for p in model.parameters())

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step != state.max_steps:
                return
            states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
            teacher = prepared.teacher
            figures = {
                "rank": int(os.environ.get("RANK", "0")),
                "teacher_bytes": sum(_local_bytes(p) for p in teacher.parameters()),
                "student_bytes": sum(_local_bytes(p) for p in model.parameters()) + self.grad_bytes
                + sum(_local_bytes(v) for v in states),
                "peak_rss": _status("VmHWM"), "rss": _status("VmRSS"),
            }
            Path(out, f"rank{figures['rank']}.json").write_text(json.dumps(figures))

    prepared = prepare(load_config(config), callbacks=[Measure()])
    prepared.trainer.train()


def run_strategy(strategy: str, models: dict, work: Path, args) -> list[dict]:
    import yaml

    out = work / f"figures-{strategy}"
    out.mkdir()
    config = {
        "student": {"name_or_path": models["student"]["path"]},
        "teacher": {"name_or_path": models["teacher"]["path"]},
        "data": {"train": str(ALPACA), "max_length": args.max_length, "limit": 64},
        "chunked_loss": {"mode": "on"},
        "distributed": {"strategy": strategy},
        "training": {"output_dir": str(work / f"run-{strategy}"), "per_device_train_batch_size": args.batch_size,
                     "max_steps": args.steps, "learning_rate": 1e-4, "save_strategy": "no", "logging_steps": 1,
                     "disable_tqdm": True, "dataloader_pin_memory": False, "report_to": "none"},
    }
    path = work / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(config))
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(args.port), __file__, "--worker", str(path),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{strategy} run failed:\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-hidden", type=int, default=1536)
    parser.add_argument("--teacher-layers", type=int, default=16)
    parser.add_argument("--student-hidden", type=int, default=768)
    parser.add_argument("--student-layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch-size", type=int, default=2, help="rows per process")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--port", type=int, default=29650)
    parser.add_argument("--small", action="store_true", help="tiny models: checks the script in a minute")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.out)
    if args.small:
        args.teacher_hidden, args.teacher_layers, args.student_hidden, args.student_layers = 128, 4, 64, 2
        args.vocab = 4096
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as tmp:
        work = Path(tmp)
        models = build_models(work, args)
        print(f"teacher {models['teacher']['parameters'] / 1e6:.1f}M parameters "
              f"(hidden {args.teacher_hidden} x {args.teacher_layers} layers), student "
              f"{models['student']['parameters'] / 1e6:.1f}M (hidden {args.student_hidden} x {args.student_layers}), "
              f"vocabulary {args.vocab}, float32, 2 processes x {args.batch_size} rows x {args.max_length} tokens, "
              f"ce + kd chunked, Adam")
        results = {s: run_strategy(s, models, work, args) for s in ("ddp", "fsdp")}
    print(f"{'strategy':<9}{'rank':>5}{'teacher MiB':>13}{'student MiB':>13}{'peak RSS MiB':>14}{'RSS end MiB':>13}")
    for strategy, ranks in results.items():
        for r in ranks:
            print(f"{strategy:<9}{r['rank']:>5}{r['teacher_bytes'] / MIB:>13.0f}{r['student_bytes'] / MIB:>13.0f}"
                  f"{r['peak_rss'] / MIB:>14.0f}{r['rss'] / MIB:>13.0f}")
    for key, name in (("teacher_bytes", "teacher held"), ("student_bytes", "student held"), ("peak_rss", "peak RSS"),
                      ("rss", "RSS at end")):
        ddp = max(r[key] for r in results["ddp"])
        fsdp = max(r[key] for r in results["fsdp"])
        print(f"{name}: fsdp / ddp = {fsdp / ddp:.2f} (largest rank)")


if __name__ == "__main__":
    main()
