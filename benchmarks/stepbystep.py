"""Distilling step-by-step on the shipped e-SNLI / CQA / SVAMP data: label accuracy of a small T5 student.

The comparison of the paper (Hsieh et al., 2023): standard fine-tuning (human labels) and standard distillation
(LLM labels) against distilling step-by-step with either kind of label, at a size that fits a 2-core CPU. For each
dataset and seed, one tokenizer (trained on the training subset's text) and one randomly initialised T5
(config-built; no pretrained checkpoint can be downloaded here), trained four times with the same steps, batch,
learning rate and seed:

    model_type  standard     label view only, no prefix: objectives {ce: 1}
                task_prefix  "[label] " and "[rationale] " views: objectives {ce: 0.5, rationale: 0.5}
    label_type  gt           the dataset's ground-truth labels
                llm          PaLM's labels (rows without one are dropped by kdistill)

Every run goes through kdistill itself (`config_from_dict` + `run_training`), and its label accuracy on the test
subset is kdistill's own step-by-step evaluation (greedy generation, normalised exact match; SVAMP: equations
compared by value). Beside each dataset: the accuracy of always answering the training subset's most frequent
label (scored by the same function), chance for multiple choice, and PaLM's labels scored on the same test subset.

Data: `--data-dir` (default ../shared/data from the repo root, a dev-only location) holding dsbs_esnli,
dsbs_cqa and dsbs_svamp. e-SNLI ships only its dev file: it is split by premise, deterministically, into a test
subset and a training subset. Subsets are copied, rows unchanged, into OUT/<dataset>/data.

    .venv/bin/python benchmarks/stepbystep.py                      # the default grid (about 18 min on 2 busy cores)
    .venv/bin/python benchmarks/stepbystep.py --small              # a ~2-minute pass through every path
    .venv/bin/python benchmarks/stepbystep.py --datasets cqa --seeds 0 --steps 100 --out runs/sbs-cqa

Resumable: a run whose result.json exists with the same settings is not trained again. Results: OUT/results.json.
Not a test: accuracies of from-scratch tiny students are low; read them against the baselines printed beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

from kdistill.apps.tiny import build_model, t5_config, train_tokenizer  # noqa: E402
from kdistill.config import config_from_dict  # noqa: E402
from kdistill.data.stepbystep import load_stepbystep  # noqa: E402
from kdistill.evaluation.accuracy import eval_equation, label_accuracy  # noqa: E402
from kdistill.pipeline import run_training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_TYPES = ("standard", "task_prefix")
LABEL_TYPES = ("gt", "llm")
OBJECTIVES = {
    "standard": {"ce": {"weight": 1.0}},
    "task_prefix": {"ce": {"weight": 0.5}, "rationale": {"type": "ce", "view": "rationale", "weight": 0.5}},
}

# name -> shipped files (relative to --data-dir), (training, test) subset sizes (default / --small; None: all rows:
# the training set's size costs no time, the steps do), default optimizer steps (the CPU time goes where a
# from-scratch student starts to learn within minutes: e-SNLI), tokens generated for a label, chance level of a
# uniform guess over the answer set (None: open answer).
DATASETS = {
    "esnli": {"train": "dsbs_esnli/esnli_valid.jsonl", "test": None, "sizes": (None, 600), "small": (256, 96),
              "steps": 400, "max_new_tokens": 4, "chance": 1 / 3},
    "cqa": {"train": "dsbs_cqa/cqa_train.jsonl", "test": "dsbs_cqa/cqa_test.jsonl", "sizes": (None, 600),
            "small": (256, 96), "steps": 100, "max_new_tokens": 12, "chance": 1 / 5},
    "svamp": {"train": "dsbs_svamp/svamp_train.jsonl", "test": "dsbs_svamp/svamp_test.jsonl", "sizes": (800, 200),
              "small": (256, 96), "steps": 100, "max_new_tokens": 20, "chance": None},
}
# default / --small: batch, learning rate, student width and depth, tokenizer size, T5
# initializer_factor (1.0, real T5's, starts a tiny from-scratch model at a loss of ~39 nats, far above ln V)
SETTINGS = {
    "default": {"batch_size": 32, "learning_rate": 3e-3, "d_model": 64, "layers": 2, "vocab": 2048,
                "init": 0.3},
    "small": {"steps": 60, "batch_size": 16, "learning_rate": 3e-3, "d_model": 32, "layers": 1, "vocab": 1024,
              "init": 0.3},
}
MAX_LENGTH, MAX_TARGET_LENGTH = 192, 128  # no input, label or PaLM rationale of the subsets is cut (reported)


def read_rows(path: Path) -> list[str]:
    """The non-blank lines of a JSONL file, unparsed (subsets are copied verbatim)."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split_by_premise(lines: list[str], n_test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, test) lines of an NLI file: whole premise groups go to one side, test first, in a seeded order."""
    groups: dict[str, list[str]] = {}
    for line in lines:
        groups.setdefault(json.loads(line)["premise"], []).append(line)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    train, test = [], []
    for premise in order:
        (test if len(test) < n_test else train).extend(groups[premise])
    return train, test


def sample(lines: list[str], n: int, seed: int = 0) -> list[str]:
    """n lines (None: all) in a seeded random order."""
    lines = list(lines)
    random.Random(seed).shuffle(lines)
    return lines if n is None else lines[:n]


def write_subsets(name: str, spec: dict, data_dir: Path, n_train: int, n_test: int, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    train_file, test_file = out / "train.jsonl", out / "test.jsonl"
    if spec["test"] is None:
        train, test = split_by_premise(read_rows(data_dir / spec["train"]), n_test)
        train = sample(train, n_train)
    else:
        train = sample(read_rows(data_dir / spec["train"]), n_train)
        test = sample(read_rows(data_dir / spec["test"]), n_test)
    train_file.write_text("\n".join(train) + "\n", encoding="utf-8")
    test_file.write_text("\n".join(test) + "\n", encoding="utf-8")
    return train_file, test_file


def baselines(name: str, spec: dict, train_file: Path, test_file: Path) -> dict:
    """Accuracy on the test subset of the most frequent training label and of PaLM's labels, by kdistill's scorer."""
    numeric = name == "svamp"
    train = load_stepbystep(train_file, name)
    test = load_stepbystep(test_file, name)
    gold = [ex.label for ex in test]
    if numeric:  # the most frequent answer value: "( 4.0 - 3.0 )" and "( 2.0 - 1.0 )" are the same answer
        values = Counter(round(eval_equation(ex.label), 4) for ex in train)
        majority = next(ex.label for ex in train if round(eval_equation(ex.label), 4) == values.most_common(1)[0][0])
    else:
        majority = Counter(ex.label for ex in train).most_common(1)[0][0]
    out = {"majority_label": majority, "majority": label_accuracy([majority] * len(gold), gold, numeric=numeric),
           "chance": spec["chance"]}
    llm = [ex.llm_label or "" for ex in test]  # a missing PaLM label counts as wrong
    out["llm_labels"] = label_accuracy(llm, gold, numeric=numeric)
    out["train_llm_label_agreement"] = label_accuracy([ex.llm_label or "" for ex in train],
                                                      [ex.label for ex in train], numeric=numeric)
    return out


def tokenizer_texts(train_file: Path, name: str) -> list[str]:
    """What the student's tokenizer is trained on: the training subset's inputs, labels and PaLM outputs."""
    texts = ["[label] ", "[rationale] "]
    for ex in load_stepbystep(train_file, name):
        texts += [ex.input, ex.label] + [t for t in (ex.llm_label, ex.llm_rationale) if t]
    return texts


def build_students(train_file: Path, name: str, settings: dict, seeds: list[int], out: Path) -> dict[int, str]:
    """One tokenizer per dataset, one randomly initialised T5 per seed, saved under `out`."""
    tokenizer = train_tokenizer(tokenizer_texts(train_file, name), vocab_size=settings["vocab"], kind="t5")
    config = t5_config(tokenizer, d_model=settings["d_model"], num_layers=settings["layers"], num_heads=4,
                       d_kv=settings["d_model"] // 4)
    config.initializer_factor = settings["init"]
    paths = {}
    for seed in seeds:
        path = out / f"student-s{seed}"
        model = build_model(config, seed=seed)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[seed] = str(path)
    return paths


def run_config(name: str, spec: dict, settings: dict, student: str, train_file: Path, test_file: Path,
               model_type: str, label_type: str, seed: int, out: Path) -> dict:
    steps = settings["steps"]
    return {
        "student": {"name_or_path": student},
        "data": {"train": str(train_file), "eval": str(test_file), "max_length": MAX_LENGTH,
                 "max_target_length": MAX_TARGET_LENGTH},
        "stepbystep": {"dataset": name, "label_type": label_type, "model_type": model_type,
                       "max_new_tokens": spec["max_new_tokens"], "eval_batch_size": 64},
        "objectives": OBJECTIVES[model_type],
        "training": {"output_dir": str(out), "per_device_train_batch_size": settings["batch_size"],
                     "max_steps": steps, "learning_rate": settings["learning_rate"], "lr_scheduler_type": "linear",
                     "warmup_steps": max(steps // 20, 1), "logging_steps": max(steps // 10, 1),
                     "save_strategy": "no", "disable_tqdm": True, "report_to": "none"},
        "seed": seed,
    }


def train_one(cfg: dict, result_file: Path, settings_key: dict) -> dict:
    """Train and evaluate one grid cell, or read its result when it was already run with the same settings."""
    if result_file.is_file():
        done = json.loads(result_file.read_text(encoding="utf-8"))
        if done.get("settings") == settings_key:
            done["resumed"] = True
            return done
    result_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(result_file.parent / "train.log", "w", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # the trainer's loss lines
        summary = run_training(config_from_dict(cfg, source=str(result_file.parent)), resume=False)
    seconds = time.perf_counter() - start
    accuracy = summary["label_accuracy"]
    logged = [h for h in summary["log_history"] if "loss" in h]
    result = {"settings": settings_key, "seconds": round(seconds, 1), "accuracy": accuracy["accuracy"],
              "correct": accuracy["correct"], "total": accuracy["total"], "invalid": accuracy["invalid"],
              "train_examples": summary["data"][0]["examples"], "truncated": summary["data"][0]["truncated"],
              "first_loss": logged[0] if logged else None, "last_loss": logged[-1] if logged else None,
              "examples": accuracy["examples"][:5]}
    for name in ("model.safetensors", "pytorch_model.bin"):  # the student is not needed after its evaluation
        (result_file.parent / name).unlink(missing_ok=True)
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.replace(result_file)
    return result


def mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = 100 * statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def table(results: dict) -> str:
    lines = ["| dataset | model_type | gt labels | llm labels | majority label | chance | PaLM labels |",
             "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        base = res["baselines"]
        chance = f"{100 * base['chance']:.1f}" if base["chance"] else "n/a"
        for model_type in MODEL_TYPES:
            cells = [mean_sd([r["accuracy"] for r in res["runs"]
                              if r["model_type"] == model_type and r["label_type"] == label_type])
                     for label_type in LABEL_TYPES]
            lines.append(f"| {name} ({res['steps']} steps) | {model_type} | {cells[0]} | {cells[1]} | "
                         f"{100 * base['majority']['accuracy']:.1f} | {chance} | "
                         f"{100 * base['llm_labels']['accuracy']:.1f} |")
    return "\n".join(lines)


def unscorable(results: dict) -> str:
    """Per dataset: the share of predictions that could not be scored (empty, or for SVAMP not an equation)."""
    parts = []
    for name, res in results.items():
        cells = []
        for model_type in MODEL_TYPES:
            runs = [r for r in res["runs"] if r["model_type"] == model_type]
            share = sum(r["invalid"] for r in runs) / max(sum(r["total"] for r in runs), 1)
            cells.append(f"{model_type} {100 * share:.0f}%")
        parts.append(f"{name}: {', '.join(cells)}")
    return "unscorable predictions (empty; SVAMP: not an equation), all runs: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding dsbs_esnli, dsbs_cqa, dsbs_svamp (default: ../shared/data)")
    parser.add_argument("--datasets", default="esnli,cqa,svamp")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of every run (default: esnli 400, cqa and svamp 100; --small 60)")
    parser.add_argument("--small", action="store_true", help="tiny subsets, model and steps: a ~2-minute pass")
    parser.add_argument("--out", default="runs/bench-stepbystep")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine 2 threads ran 8x slower per step)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        parser.error(f"--datasets: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(DATASETS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    if not seeds:
        parser.error("--seeds: give at least one seed")
    settings = dict(SETTINGS["small" if args.small else "default"])
    data_dir, out = Path(args.data_dir), Path(args.out)
    missing = [str(data_dir / DATASETS[n]["train"]) for n in names if not (data_dir / DATASETS[n]["train"]).is_file()]
    if missing:
        parser.error(f"data not found: {', '.join(missing)} (set --data-dir)")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"settings: {settings}, steps {args.steps or 'per dataset'}, seeds {seeds}, out {out}", flush=True)
    start = time.perf_counter()
    results = {}
    for name in names:
        spec = DATASETS[name]
        n_train, n_test = spec["small" if args.small else "sizes"]
        steps = args.steps or settings.get("steps") or spec["steps"]
        run_settings = settings | {"steps": steps}
        work = out / name
        train_file, test_file = write_subsets(name, spec, data_dir, n_train, n_test, work / "data")
        base = baselines(name, spec, train_file, test_file)
        students = build_students(train_file, name, run_settings, seeds, work)
        key = {**run_settings, "train": n_train, "test": n_test, "max_length": MAX_LENGTH,
               "max_target_length": MAX_TARGET_LENGTH}
        runs = []
        for seed in seeds:
            for model_type in MODEL_TYPES:
                for label_type in LABEL_TYPES:
                    run_dir = work / f"{model_type}-{label_type}-s{seed}"
                    cfg = run_config(name, spec, run_settings, students[seed], train_file, test_file, model_type,
                                     label_type, seed, run_dir)
                    result = train_one(cfg, run_dir / "result.json", key | {"seed": seed})
                    runs.append({"model_type": model_type, "label_type": label_type, "seed": seed} | result)
                    print(f"{name} {model_type:11s} {label_type:3s} seed {seed}: accuracy "
                          f"{100 * result['accuracy']:.1f}% ({result['correct']}/{result['total']}, "
                          f"{result['invalid']} invalid), {result['seconds']:.0f} s"
                          + (" (done before)" if result.get("resumed") else ""), flush=True)
        results[name] = {"train": len(read_rows(train_file)), "test": len(read_rows(test_file)), "steps": steps,
                         "baselines": base, "runs": runs}
    wall = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"settings": settings, "seeds": seeds, "wall_seconds": round(wall),
                                                  "datasets": results}, indent=1) + "\n", encoding="utf-8")
    print()
    print(table(results))
    print(f"\nlabel accuracy (%) on the test subset, mean ± sd over seeds {seeds}; columns after llm: baselines on "
          "the same test subset")
    print(unscorable(results))
    print(f"total wall time: {wall:.0f} s ({wall / 60:.1f} min); results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
