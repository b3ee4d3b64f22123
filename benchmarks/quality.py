"""Distillation quality, measured: CE vs logit KD (forward KL, reverse KL, JSD), SeqKD and KD from the top-k cache,
with one budget, on held-out instructions. Offline, on a teacher and students trained here.

    .venv/bin/python benchmarks/quality.py                 # the README's table (about 40 min on 2 CPU cores)
    .venv/bin/python benchmarks/quality.py --small         # a quick pass (a few minutes)
    .venv/bin/python benchmarks/quality.py --judge-base-url http://127.0.0.1:8000/v1 --judge-model NAME

What it does, every step through kdistill's own commands (it is their first user, not a second implementation):

1. **Data** (OUT/data): Alpaca rows shipped in examples/data. Rows 1,800-1,999 of `alpaca_2000.jsonl` and the 64
   Alpaca-GPT-4 rows are held out (`heldout_alpaca`, `heldout_gpt4`); the teacher trains on the first 1,800 rows
   (plus, when `--extra-teacher-data` is given, more rows, minus any held-out instruction); the students on the
   first `--student-rows` of them (a subset of the teacher's data).
2. **Teacher** (`kdistill tiny`): a bigger model pre-trained longer on more data than any student sees, so that it
   knows clearly more than a student trained with CE alone (its held-out perplexity is printed beside theirs).
3. **SeqKD data** (`kdistill annotate --task output`): the teacher's greedy answers to the students' prompts, stopped
   at its chat template's end-of-turn token; annotate prints (and the report shows) whether they look degenerate.
4. **The comparison** (`kdistill compare`): identical budgets (steps, batch, learning rate, seeds) for
   `ce` (CE alone), `fkl` / `rkl` / `jsd` (0.5 CE + 0.5 divergence), `seqkd` (CE on the teacher's answers) and
   `cached` (0.5 CE + 0.5 forward KL from a top-64 cache). Every student and the teacher are evaluated on both held-out
   sets: perplexity of the reference answers, KL(teacher || student), top-1 agreement, and ROUGE-L of greedy answers
   (Google's rouge-score); with `--judge-base-url`, the LLM judge's 0-5 scores and valid counts too.
   On-policy KD (issue #15) and cross-tokenizer KD (#17) join as variants once they exist.
5. **Report** (OUT/compare/report/report.md and .html): one table per metric, models x datasets, mean +- sd over
   seeds, differences to `ce`.

Every step is resumable: rerunning the command keeps what is finished.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "examples" / "data"

MAX_LENGTH = 128  # tokens per training row (prompt + response), teacher and students
SIZES = {  # (default, --small)
    "teacher": ({"hidden": 160, "layers": 4, "heads": 4, "steps": 1000, "batch": 16},
                {"hidden": 128, "layers": 2, "heads": 4, "steps": 150, "batch": 16}),
    "student": ({"hidden": 64, "layers": 2, "heads": 4}, {"hidden": 48, "layers": 2, "heads": 4}),
    "student_rows": (600, 200),
    "steps": (400, 40),
    "heldout_limit": (None, 32),
    "generate_limit": (64, 8),
    "seeds": ([0, 1], [0]),
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare_data(out: Path, student_rows: int, extra: list[Path]) -> dict[str, Path]:
    alpaca = read_jsonl(SHIPPED / "alpaca_2000.jsonl")
    gpt4 = read_jsonl(SHIPPED / "alpaca_gpt4_eval_64.jsonl")
    teacher_rows, held = alpaca[:1800], alpaca[1800:]
    held_keys = {(r["instruction"], r.get("input", "")) for r in held + gpt4}
    for path in extra:
        teacher_rows += [r for r in read_jsonl(path) if (r.get("instruction"), r.get("input", "")) not in held_keys]
    data = out / "data"
    return {
        "teacher": write_jsonl(data / "teacher_train.jsonl", teacher_rows),
        "student": write_jsonl(data / "student_train.jsonl", alpaca[:student_rows]),
        "heldout_alpaca": write_jsonl(data / "heldout_alpaca.jsonl", held),
        "heldout_gpt4": write_jsonl(data / "heldout_gpt4.jsonl", gpt4),
    }


def kdistill(*args: str) -> None:
    cmd = [sys.executable, "-m", "kdistill.cli", *args]
    print("$ kdistill " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def build_pair(out: Path, data: dict[str, Path], small: bool) -> Path:
    pair = out / "pair"
    if (pair / "tiny.json").is_file():
        print(f"{pair}: teacher and student exist, kept")
        return pair
    t, s = SIZES["teacher"][small], SIZES["student"][small]
    kdistill("tiny", "--out", str(pair), "--kind", "causal", "--data", str(data["teacher"]), "--vocab-size", "4096",
             "--teacher-hidden", str(t["hidden"]), "--teacher-layers", str(t["layers"]),
             "--teacher-heads", str(t["heads"]), "--teacher-steps", str(t["steps"]),
             "--teacher-batch-size", str(t["batch"]), "--teacher-max-length", str(MAX_LENGTH), "--teacher-lr", "3e-3",
             "--student-hidden", str(s["hidden"]), "--student-layers", str(s["layers"]),
             "--student-heads", str(s["heads"]))
    return pair


def seqkd_data(out: Path, pair: Path, data: dict[str, Path], max_new_tokens: int) -> Path:
    export = out / "data" / "student_train_teacher_answers.jsonl"
    kdistill("annotate", "--task", "output", "--model", str(pair / "teacher"), "--data", str(data["student"]),
             "--out", str(out / "data" / "seqkd_annotations.jsonl"), "--max-new-tokens", str(max_new_tokens),
             "--batch-size", "16", "--export", str(export), "--no-progress")
    return export


def write_specs(out: Path, pair: Path, data: dict[str, Path], seqkd: Path, small: bool, args) -> Path:
    base = {
        "teacher": {"name_or_path": str(pair / "teacher")},
        "student": {"name_or_path": str(pair / "student")},
        "data": {"train": str(data["student"]), "max_length": MAX_LENGTH, "skip_invalid": True},
        "objectives": {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "divergence": "forward_kl"}},
        "training": {"output_dir": str(out / "unused"), "max_steps": args.steps or SIZES["steps"][small],
                     "per_device_train_batch_size": 16, "learning_rate": 3.0e-3, "lr_scheduler_type": "cosine",
                     "warmup_steps": 20, "logging_steps": 20, "save_strategy": "steps", "save_steps": 200,
                     "save_total_limit": 1, "disable_tqdm": True},
    }
    (out / "base.yaml").write_text(json.dumps(base, indent=2), encoding="utf-8")  # JSON is YAML
    seeds = args.seeds or SIZES["seeds"][small]
    spec = {
        "base": str(out / "base.yaml"),
        "out": str(out / "compare"),
        "seeds": seeds,
        "baseline": "ce",
        "variants": {
            "ce": {"objectives": {"ce": {"weight": 1.0}}},
            "fkl": {"objectives.kd.divergence": "forward_kl"},
            "rkl": {"objectives.kd.divergence": "reverse_kl"},
            "jsd": {"objectives.kd.divergence": "jsd", "objectives.kd.beta": 0.5},
            "seqkd": {"objectives": {"ce": {"weight": 1.0}}, "data.train": str(seqkd)},
            "cached": {"cache.dir": str(out / "cache-top64"), "cache.k": 64, "objectives.kd.missing": "bucket"},
        },
        "eval": {"data": {"alpaca": str(data["heldout_alpaca"]), "gpt4": str(data["heldout_gpt4"])},
                 "limit": SIZES["heldout_limit"][small], "skip_invalid": True,
                 "generate": {"limit": SIZES["generate_limit"][small], "max_new_tokens": 96}},
    }
    if args.judge_base_url:
        spec["eval"]["judge"] = {"base_url": args.judge_base_url, "model": args.judge_model}
    path = out / "compare.yaml"
    path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-quality", help="Work folder (default: runs/bench-quality)")
    p.add_argument("--small", action="store_true", help="Small sizes: a quick pass, not the README's figures")
    p.add_argument("--steps", type=int, default=None, help="Student optimizer steps (default 400; --small 40)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="Comma-separated seeds for every method (default 0,1; --small 0)")
    p.add_argument("--student-rows", type=int, default=None, help="Student training rows (default 600)")
    p.add_argument("--extra-teacher-data", action="append", default=[], type=Path,
                   help="More Alpaca-format rows for the teacher only (held-out instructions are removed)")
    p.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint of an LLM judge (optional)")
    p.add_argument("--judge-model", default=None, help="The judge's model name at --judge-base-url")
    p.add_argument("--stop-after", choices=("data", "pair", "seqkd"), default=None,
                   help="Stop after this step (the next run continues from there)")
    args = p.parse_args()
    if bool(args.judge_base_url) != bool(args.judge_model):
        p.error("--judge-base-url and --judge-model go together")
    start = time.perf_counter()
    out = Path(args.out)
    data = prepare_data(out, args.student_rows or SIZES["student_rows"][args.small], args.extra_teacher_data)
    if args.stop_after == "data":
        return 0
    pair = build_pair(out, data, args.small)
    if args.stop_after == "pair":
        return 0
    seqkd = seqkd_data(out, pair, data, max_new_tokens=96)
    if args.stop_after == "seqkd":
        return 0
    spec = write_specs(out, pair, data, seqkd, args.small, args)
    kdistill("compare", str(spec), "--no-progress")
    print(f"\nteacher: {json.dumps(json.loads((pair / 'tiny.json').read_text()).get('teacher', {}))}")
    print(f"report: {out / 'compare' / 'report' / 'report.md'}")
    print(f"total wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
