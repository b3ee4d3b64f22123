"""On-policy distillation, measured: CE, off-policy KD and on-policy KD (GKD's full-vocabulary reverse KL, and the
sampled-token policy gradient) with one budget, scored on the students' OWN answers to held-out prompts.
Offline, on a teacher and students trained here.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/on_policy.py          # the README's table (~17 min, 2 CPU cores)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/on_policy.py --small  # a quick pass (~2.5 min)

Steps (each resumable: a finished one is kept when the command is rerun):

1. **Data** (OUT/data): the split of `benchmarks/quality.py` (its `prepare_data`): the teacher trains on Alpaca rows
   0-1,799 of `examples/data/alpaca_2000.jsonl`, students on the first `student_rows` of them; rows 1,800-1,999 are
   held out. The on-policy students get the same rows without their `output` (prompt-only rows).
2. **Pair** (`kdistill tiny`): a teacher pre-trained with CE on all 1,800 rows, and a smaller random student.
3. **Warm start** (`kdistill train`, CE): the student is first fine-tuned briefly on the dataset's answers, so that
   it writes text rather than noise when the on-policy variants start sampling from it (as GKD starts from a
   supervised student). Every variant below starts from this checkpoint.
4. **Variants** (`kdistill train`), identical steps, batch, learning rate, schedule and seed:
   `ce` (CE on the dataset's answers), `kd_fkl` / `kd_rkl` (off-policy KD, forward / reverse KL on the dataset's
   answers), `onpolicy_rkl` (on_policy mode divergence, reverse KL, lmbda 1, prompts only) and `onpolicy_token`
   (on_policy mode sampled_token, lmbda 1, prompts only).
5. **Measurement** (here, with kdistill's pieces): for each model and the first `prompts` held-out prompts, greedy
   answers (`generate`, no sampling) and `samples` sampled answers per prompt (`kdistill.onpolicy.HFGenerate`,
   temperature 1, fixed per-answer seeds shared by all models), cut at the first stop token as training cuts them
   (`sampled_batch`); then the teacher's per-token NLL of those answers, and on the sampled ones the full-vocabulary
   reverse KL(student || teacher) per token (`kdistill.losses.reverse_kl`, token-weighted mean), with bootstrap
   standard errors over the prompts (and a paired one for the difference to `kd_fkl`). Greedy answers of models
   this small often loop; the table gives their distinct-token share and how many ran to `max_new_tokens`, since
   a loop the teacher also likes scores a low NLL.
6. **`kdistill eval lm`** on the held-out reference answers (perplexity, KL(teacher || student)), and seconds per
   optimizer step with the generation share (the runs' `on_policy/generation_seconds` logs vs `train_runtime`).

Prints a Markdown table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import MAX_LENGTH, kdistill, prepare_data, read_jsonl, write_jsonl  # noqa: E402

from kdistill.config import ModelConfig  # noqa: E402
from kdistill.data import DataCollatorForDistillation, load_examples  # noqa: E402
from kdistill.data.prompt_rows import encode_for_sampling  # noqa: E402
from kdistill.losses import reverse_kl  # noqa: E402
from kdistill.models import align_positions, kd_vocab_size, load_model, load_tokenizer  # noqa: E402
from kdistill.onpolicy import (HFGenerate, SamplingParams, answer_lengths, left_padded_prompts, row_seed,  # noqa: E402
                               sampled_batch, stop_ids_for)

SIZES = {  # (default, --small)
    "teacher": ({"hidden": 128, "layers": 4, "heads": 4, "steps": 600, "batch": 16},
                {"hidden": 96, "layers": 2, "heads": 4, "steps": 100, "batch": 16}),
    "student": ({"hidden": 48, "layers": 2, "heads": 4}, {"hidden": 32, "layers": 2, "heads": 4}),
    "student_rows": (800, 160),
    "warm_steps": (200, 20),
    "steps": (300, 20),
    "batch": (16, 8),
    "max_new_tokens": (64, 32),
    "prompts": (64, 12),
    "samples": (4, 2),
    "eval_limit": (None, 32),
}
LR = 3.0e-3
SUMMARY = "kdistill_summary.json"
SEED = 0
BASELINE = "kd_fkl"  # the sampled answers' figures get a paired standard error of their difference to this run
VARIANTS = {  # name -> (config fields over the base, student rows: "answers" or "prompts", label)
    "ce": ({"objectives": {"ce": {"weight": 1.0}}, "teacher": {"name_or_path": None}}, "answers",
           "CE on the dataset's answers"),
    "kd_fkl": ({"objectives": {"kd": {"weight": 1.0, "divergence": "forward_kl"}}}, "answers",
               "off-policy KD, forward KL"),
    "kd_rkl": ({"objectives": {"kd": {"weight": 1.0, "divergence": "reverse_kl"}}}, "answers",
               "off-policy KD, reverse KL"),
    "onpolicy_rkl": ({"objectives": {"kd": {"weight": 1.0, "divergence": "reverse_kl"}},
                      "on_policy": {"lmbda": 1.0, "mode": "divergence"}}, "prompts",
                     "on-policy, reverse KL (divergence)"),
    "onpolicy_token": ({"objectives": {"kd": {"weight": 1.0, "divergence": "reverse_kl"}},
                        "on_policy": {"lmbda": 1.0, "mode": "sampled_token"}}, "prompts",
                       "on-policy, sampled-token"),
}


# ------------------------------------------------------------------------------------------------ training
def build_pair(out: Path, teacher_data: Path, small: bool) -> Path:
    pair, t, s = out / "pair", SIZES["teacher"][small], SIZES["student"][small]
    args = ["tiny", "--out", str(pair), "--kind", "causal", "--data", str(teacher_data), "--vocab-size", "2048",
            "--seed", str(SEED), "--teacher-hidden", str(t["hidden"]), "--teacher-layers", str(t["layers"]),
            "--teacher-heads", str(t["heads"]), "--teacher-steps", str(t["steps"]),
            "--teacher-batch-size", str(t["batch"]), "--teacher-max-length", str(MAX_LENGTH), "--teacher-lr", "3e-3",
            "--student-hidden", str(s["hidden"]), "--student-layers", str(s["layers"]),
            "--student-heads", str(s["heads"]), "--no-progress"]
    record = out / "pair.args.json"
    if (pair / "tiny.json").is_file() and record.is_file() and json.loads(record.read_text()) == args:
        print(f"{pair}: teacher and student exist, kept")
        return pair
    kdistill(*args)
    record.write_text(json.dumps(args), encoding="utf-8")
    return pair


def train(out: Path, name: str, config: dict, after: Path) -> Path:
    """`kdistill train` one config (JSON is YAML) into OUT/runs/NAME, unless it finished before with this config and
    after the file `after` (what its models come from) was last written."""
    folder = out / "runs" / name
    config["training"]["output_dir"] = str(folder)
    path, text, summary = out / "configs" / f"{name}.yaml", json.dumps(config, indent=2), folder / SUMMARY
    if (summary.is_file() and summary.stat().st_mtime > after.stat().st_mtime and path.is_file()
            and path.read_text(encoding="utf-8") == text):
        print(f"{folder}: trained before with this config, kept")
        return folder
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    kdistill("train", str(path), "--no-resume")
    return folder


def base_config(student: Path, teacher: Path, steps: int, batch: int) -> dict:
    return {
        "teacher": {"name_or_path": str(teacher)},
        "student": {"name_or_path": str(student)},
        "data": {"train": None, "max_length": MAX_LENGTH},
        "training": {"max_steps": steps, "per_device_train_batch_size": batch, "learning_rate": LR,
                     "lr_scheduler_type": "cosine", "warmup_steps": max(1, steps // 10), "logging_steps": 10,
                     "save_strategy": "no", "disable_tqdm": True, "report_to": []},
        "seed": SEED,
    }


def variant_config(base: dict, fields: dict, rows: Path, max_new_tokens: int) -> dict:
    config = json.loads(json.dumps(base))
    config["data"]["train"] = str(rows)
    for key, value in fields.items():
        config[key] = {**config.get(key, {}), **value} if key == "teacher" else value
    if "on_policy" in config:
        config["on_policy"] = {**config["on_policy"], "max_new_tokens": max_new_tokens}
    if config["teacher"]["name_or_path"] is None:
        del config["teacher"]
    return config


def timing(folder: Path, steps: int) -> dict:
    """Seconds per optimizer step, and the seconds spent generating per step (on-policy runs), from the logs."""
    history = json.loads((folder / SUMMARY).read_text())["log_history"]
    runtime = next(e["train_runtime"] for e in reversed(history) if "train_runtime" in e)
    generation, last = 0.0, 0
    for e in history:
        if "on_policy/generation_seconds" in e:  # the mean over the on-policy steps since the previous log
            generation += e["on_policy/generation_seconds"] * (e["step"] - last)  # lmbda 1: every step samples
            last = e["step"]
    logged = [e for e in history if "on_policy/student_answer_length" in e]
    out = {"train_seconds": runtime, "seconds_per_step": runtime / steps, "generation_share": generation / runtime,
           "generation_seconds_logged_steps": last}
    if logged:
        out["train_answer_length_last_log"] = logged[-1]["on_policy/student_answer_length"]
        out["train_truncated_last_log"] = logged[-1].get("on_policy/student_truncated")
    return out


# ----------------------------------------------------------------------------------------------- measurement
def heldout_prompt_batches(path: Path, tokenizer, limit: int, batch: int) -> list[dict]:
    """Collated micro-batches of held-out prompts (encoded as on-policy training encodes its rows)."""
    loaded = load_examples(str(path), limit=limit, skip_invalid=True)
    rows, _, _ = encode_for_sampling(loaded.examples, tokenizer, template="auto", max_length=MAX_LENGTH)
    collate = DataCollatorForDistillation(pad_token_id=tokenizer.pad_token_id)
    return [collate(rows[i:i + batch]) for i in range(0, len(rows), batch)]


@torch.no_grad()
def greedy(model, ids, mask, params: SamplingParams) -> torch.Tensor:
    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=list(params.stop_ids), pad_token_id=params.pad_id)
    saved = model.generation_config
    model.generation_config = GenerationConfig()  # no hub defaults (none here; kept plain on purpose)
    try:
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    finally:
        model.generation_config = saved


@torch.no_grad()
def score(student, teacher, batch: dict, vocab: int) -> dict[str, torch.Tensor]:
    """(B,) sums over each answer's tokens of one sampled_batch: tokens, teacher NLL, student NLL, reverse KL(s||t)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s_logits, targets = align_positions(student(**inputs).logits, batch["labels"], False)
    t_logits = align_positions(teacher(**inputs).logits, None, False)
    s, t, mask = s_logits[..., :vocab].float(), t_logits[..., :vocab].float(), targets != -100
    y = targets.clamp(min=0).unsqueeze(-1)
    nll = {f"{who}_nll": -(logits.log_softmax(-1).gather(-1, y).squeeze(-1) * mask).sum(-1)
           for who, logits in (("teacher", t), ("student", s))}
    return {"tokens": mask.sum(-1).float(), **nll, "reverse_kl": reverse_kl(s, t, mask=mask, reduction="none").sum(-1)}


SUMS = ("tokens", "teacher_nll", "student_nll", "reverse_kl")


def measure(model_dir: Path | None, teacher, tokenizer, batches: list[dict], params: SamplingParams,
            samples: int) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """The figures of one model's own answers (None: the teacher's), and per-prompt sums (for the bootstrap)."""
    student = teacher if model_dir is None else load_model(ModelConfig(name_or_path=str(model_dir))).eval()
    vocab = kd_vocab_size(tokenizer, teacher, student)
    backend = HFGenerate()
    per_prompt = {k: {key: [] for key in SUMS} for k in ("greedy", "sampled")}
    counts = {k: {"answers": 0, "truncated": 0, "distinct": 0.0} for k in ("greedy", "sampled")}
    start, index = time.perf_counter(), 0
    for batch in batches:
        ids, mask, prompts = left_padded_prompts(batch, params.pad_id)
        runs = [("greedy", greedy(student, ids, mask, params))]
        for k in range(samples):
            seeds = [row_seed("bench-on-policy", SEED, index + i, k) for i in range(len(prompts))]
            runs.append(("sampled", backend.generate(student, ids, mask, seeds, params)))
        index += len(prompts)
        sums = {kind: {key: torch.zeros(len(prompts)) for key in SUMS} for kind in per_prompt}
        for kind, new in runs:
            answers, _ = sampled_batch(batch, prompts, new, params.stop_ids, params.max_new_tokens, params.pad_id,
                                       "student")
            lengths, cut = answer_lengths(new, params.stop_ids, params.max_new_tokens)
            for key, value in score(student, teacher, answers, vocab).items():
                sums[kind][key] += value
            c = counts[kind]
            c["answers"] += len(prompts)
            c["truncated"] += int(cut.sum())
            c["distinct"] += sum(len(set(row[:n].tolist())) / max(int(n), 1) for row, n in zip(new, lengths))
        for kind in per_prompt:
            for key in SUMS:
                per_prompt[kind][key].append(sums[kind][key])
    arrays = {kind: {key: torch.cat(v) for key, v in d.items()} for kind, d in per_prompt.items()}
    result = {}
    for kind, c in counts.items():
        total = {key: float(v.sum()) for key, v in arrays[kind].items()}
        n = max(total["tokens"], 1.0)
        result[kind] = {"answers": c["answers"], "tokens": int(total["tokens"]),
                        "mean_length": total["tokens"] / max(c["answers"], 1),
                        "truncated_share": c["truncated"] / max(c["answers"], 1),
                        "distinct_share": c["distinct"] / max(c["answers"], 1),
                        **{key: total[key] / n for key in SUMS[1:]}}
    result["seconds"] = time.perf_counter() - start
    return result, arrays


def bootstrap(arrays: dict[str, dict[str, torch.Tensor]], baseline: str, resamples: int = 2000) -> dict:
    """Standard errors over prompts of the sampled answers' token means, and of each model's difference to
    `baseline` (paired: the same prompt resamples for every model)."""
    g = torch.Generator().manual_seed(SEED)
    n = len(next(iter(arrays.values()))["tokens"])
    idx = torch.randint(0, n, (resamples, n), generator=g)

    def means(a, key):
        return a[key][idx].sum(-1) / a["tokens"][idx].sum(-1).clamp(min=1)

    out = {}
    for name, a in arrays.items():
        out[name] = {}
        for key in ("teacher_nll", "reverse_kl"):
            m = means(a, key)
            out[name][f"{key}_se"] = float(m.std())
            if name != baseline and baseline in arrays:
                out[name][f"{key}_minus_{baseline}_se"] = float((m - means(arrays[baseline], key)).std())
    return out


def eval_lm(out: Path, teacher: Path, students: dict[str, Path], heldout: Path, limit: int | None) -> dict:
    path = out / "eval_lm.json"
    newest = max((folder / SUMMARY).stat().st_mtime for folder in students.values())
    if path.is_file() and path.stat().st_mtime > newest:
        done = json.loads(path.read_text())
        if set(done["datasets"]["heldout"]["students"]) == set(students):
            print(f"{path}: evaluated after the last training run, kept")
            return done
    args = ["eval", "lm", "--teacher", str(teacher), "--data", f"heldout={heldout}", "--max-length",
            str(MAX_LENGTH), "--batch-size", "16", "--out", str(path)]
    for name, folder in students.items():
        args += ["--student", f"{name}={folder}"]
    if limit:
        args += ["--limit", str(limit)]
    kdistill(*args)
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------- report
def with_se(figures: dict, key: str) -> str:
    se = figures.get(f"{key}_se")
    return f"{figures[key]:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def difference(results: dict, figures: dict, key: str) -> str:
    se = figures.get(f"{key}_minus_{BASELINE}_se")
    if se is None:
        return "-"
    return f"{figures[key] - results['models'][BASELINE]['own_answers']['sampled'][key]:+.3f} ± {se:.3f}"


def table(results: dict) -> str:
    head = ["model", "teacher NLL, greedy answers", "greedy: distinct tokens, hit max", "teacher NLL, sampled answers",
            "reverse KL, sampled answers", f"reverse KL minus {BASELINE}'s (paired)", "perplexity (references)",
            "KL(t‖s) (references)", "s / step", "generation share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["models"].values():
        g, s, lm, tm = r["own_answers"]["greedy"], r["own_answers"]["sampled"], r["eval_lm"], r.get("timing")
        cells = [r["label"], f"{g['teacher_nll']:.3f}", f"{g['distinct_share']:.0%}, {g['truncated_share']:.0%}",
                 with_se(s, "teacher_nll"), with_se(s, "reverse_kl"), difference(results, s, "reverse_kl"),
                 f"{lm['perplexity']:.1f}",
                 f"{lm['kl']:.3f}" if "kl" in lm else "-", f"{tm['seconds_per_step']:.2f}" if tm else "-",
                 f"{tm['generation_share']:.0%}" if tm and tm["generation_share"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/bench-on-policy", help="Work folder (default: outputs/bench-on-policy)")
    p.add_argument("--small", action="store_true", help="Small sizes: a quick pass, not the README's figures")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps per variant (default 300; --small 20)")
    args = p.parse_args()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    small = args.small
    out = Path(args.out)
    steps, batch = args.steps or SIZES["steps"][small], SIZES["batch"][small]
    max_new = SIZES["max_new_tokens"][small]

    data = prepare_data(out, SIZES["student_rows"][small], [])
    prompts_only = write_jsonl(out / "data" / "student_train_prompts.jsonl",
                               [{k: v for k, v in r.items() if k != "output"} for r in read_jsonl(data["student"])])
    pair = build_pair(out, data["teacher"], small)
    teacher_dir = pair / "teacher"

    warm_cfg = variant_config(base_config(pair / "student", teacher_dir, SIZES["warm_steps"][small], batch),
                              VARIANTS["ce"][0], data["student"], max_new)
    warm = train(out, "warm_start", warm_cfg, pair / "tiny.json")
    base = base_config(warm, teacher_dir, steps, batch)
    folders = {"warm_start": warm}
    for name, (fields, rows, _) in VARIANTS.items():
        config = variant_config(base, fields, data["student"] if rows == "answers" else prompts_only, max_new)
        folders[name] = train(out, name, config, warm / SUMMARY)

    lm = eval_lm(out, teacher_dir, folders, data["heldout_alpaca"], SIZES["eval_limit"][small])["datasets"]["heldout"]
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(teacher_dir)))
    teacher = load_model(ModelConfig(name_or_path=str(teacher_dir)), role="teacher").eval()
    params = SamplingParams(max_new_tokens=max_new, temperature=1.0, stop_ids=stop_ids_for(tokenizer, teacher),
                            pad_id=tokenizer.pad_token_id, vocab_limit=len(tokenizer))
    batches = heldout_prompt_batches(data["heldout_alpaca"], tokenizer, SIZES["prompts"][small], 16)
    results = {"settings": {"small": small, "steps": steps, "batch": batch, "lr": LR, "seed": SEED,
                            "warm_steps": SIZES["warm_steps"][small], "max_new_tokens": max_new,
                            "prompts": sum(len(b["input_ids"]) for b in batches), "samples": SIZES["samples"][small],
                            "max_length": MAX_LENGTH, "threads": torch.get_num_threads(),
                            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
               "pair": json.loads((pair / "tiny.json").read_text()), "models": {}}
    labels = {"teacher": "teacher (reference)", "warm_start": "warm start (CE, the variants' start)",
              **{k: v[2] for k, v in VARIANTS.items()}}
    sampled = {}
    for name in ["teacher", *folders]:
        print(f"measuring {name} on {results['settings']['prompts']} held-out prompts", flush=True)
        figures, arrays = measure(folders.get(name), teacher, tokenizer, batches, params, SIZES["samples"][small])
        entry = {"label": labels[name], "own_answers": figures}
        sampled[name] = arrays["sampled"]
        if name == "teacher":
            entry["eval_lm"] = lm["teacher"]
        else:
            entry["eval_lm"] = lm["students"][name]
            entry["timing"] = timing(folders[name], SIZES["warm_steps"][small] if name == "warm_start" else steps)
        results["models"][name] = entry
    for name, errors in bootstrap({k: v for k, v in sampled.items() if k != "teacher"}, BASELINE).items():
        results["models"][name]["own_answers"]["sampled"].update(errors)
    results["eval_lm_tokens"] = lm["tokens"]
    results["wall_seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print()
    print(table(results))
    print(f"\nresults: {out / 'results.json'}")
    print(f"total wall time: {results['wall_seconds']:.0f} s (this invocation; finished steps are kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
