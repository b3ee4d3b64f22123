"""`kdistill compare SPEC.yaml`: train every variant x seed with one budget, evaluate all of them and the teacher
on the same held-out sets, and write one report with means, spreads and the difference to the baseline.

Steps, each resumable (a rerun redoes only what is missing):

1. **train**: each run folder `OUT/<variant>-seed<seed>` is a `kdistill train` output. A finished run (its
   summary written and its saved config equal to what the spec now asks for) is kept; an interrupted one resumes
   from its last checkpoint; a finished run whose settings differ from the spec is refused (delete the folder or
   choose another `out`). A variant with `cache.dir` gets its top-k cache written first (`kdistill cache`).
2. **eval lm**: per held-out set, the teacher runs once per pass over a few students (KL(teacher || student),
   reverse KL, top-1 agreement, perplexity of the reference answers); each run folder gets `eval_lm.json` with the
   teacher and its own student, `OUT/teacher/eval_lm.json` the teacher alone.
3. **generate + ROUGE** (`eval.generate`): greedy answers of every model to the first `limit` rows of each set,
   `answers/<set>.jsonl` in its folder, scored with ROUGE against the references (`rouge.json`).
4. **judge** (`eval.judge`): the LLM judge scores those answers (`judge.json`, with the valid-judgement counts).
5. **report**: `kdistill report` over all folders, with the baseline's differences (`OUT/report`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from kdistill.compare.spec import CompareSpec
from kdistill.config import CONFIG_FILENAME, ModelConfig, load_config, to_dict
from kdistill.errors import ConfigError
from kdistill.evaluation.generate import generate_file
from kdistill.evaluation.judge_run import judge_file
from kdistill.evaluation.lm import lm_diagnostics
from kdistill.evaluation.rouge import rouge_scores
from kdistill.generators import ChatClient
from kdistill.models import load_model, load_tokenizer
from kdistill.paths import write_json_atomic
from kdistill.pipeline import run_training
from kdistill.recipes.lm import build_cache
from kdistill.report import build_report
from kdistill.report_data import SUMMARY_FILE

__all__ = ["run_compare", "train_runs", "evaluate_runs", "generate_runs", "STUDENTS_PER_PASS"]

logger = logging.getLogger(__name__)

STUDENTS_PER_PASS = 4  # students held in memory beside the teacher during eval lm


def _run_config(spec: CompareSpec, variant: str, seed: int):
    v = spec.variants[variant]
    owned = [f"training.output_dir={json.dumps(str(spec.run_dir(variant, seed)))}", f"seed={seed}"]
    return load_config(spec.base, [*v.overrides, *owned])


def _plain(data):
    return json.loads(json.dumps(data, default=str))


def _finished(cfg, run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished run of exactly `cfg` (refused when it holds another run)."""
    summary, saved = run_dir / SUMMARY_FILE, run_dir / CONFIG_FILENAME
    if not summary.is_file() or not saved.is_file():
        return False
    old, new = _plain(yaml.safe_load(saved.read_text(encoding="utf-8"))), _plain(to_dict(cfg))
    if old != new:
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ConfigError(f"{run_dir}: holds a finished run with other settings ({', '.join(keys)} differ); delete "
                          f"the folder to retrain it, or give the comparison another `out:`")
    return True


def train_runs(spec: CompareSpec) -> None:
    """Step 1 (see the module docstring)."""
    configs = {(v, s): _run_config(spec, v, s) for v, s in spec.runs}  # every config checked before any training
    for (variant, seed), cfg in configs.items():
        run_dir = spec.run_dir(variant, seed)
        if _finished(cfg, run_dir):
            logger.info("%s: finished earlier, kept", run_dir)
            continue
        if cfg.cache.dir:
            build_cache(cfg)
        print(f"compare: training {run_dir.name}", flush=True)
        run_training(cfg)


def evaluate_runs(spec: CompareSpec, progress: bool = True) -> None:
    """Step 2 (see the module docstring)."""
    run_dirs = [spec.run_dir(v, s) for v, s in spec.runs]
    teacher_path, max_length = spec.teacher, spec.eval.max_length
    tokenizer = load_tokenizer(ModelConfig(name_or_path=teacher_path))
    teacher = load_model(ModelConfig(name_or_path=teacher_path), role="teacher")
    per_run: dict[Path, dict] = {d: {} for d in run_dirs}
    teacher_only: dict[str, dict] = {}
    for name, data in spec.eval.data.items():
        for start in range(0, len(run_dirs), STUDENTS_PER_PASS):
            group = run_dirs[start:start + STUDENTS_PER_PASS]
            students = {d.name: load_model(ModelConfig(name_or_path=str(d))) for d in group}
            result = lm_diagnostics(teacher, students, tokenizer, data, max_length=max_length,
                                    batch_size=spec.eval.batch_size, limit=spec.eval.limit,
                                    skip_invalid=spec.eval.skip_invalid, progress=progress)
            for d in group:
                per_run[d][name] = {**result, "students": {d.name: result["students"][d.name]}}
            teacher_only[name] = {**result, "students": {}}
            del students
    head = {"kind": "lm", "max_length": max_length, "teacher": {"path": teacher_path}}
    for d, datasets in per_run.items():
        write_json_atomic(d / "eval_lm.json", {**head, "datasets": datasets}, default=str)
    write_json_atomic(spec.teacher_dir / "eval_lm.json", {**head, "datasets": teacher_only}, default=str)


def _judge_client(spec: CompareSpec):
    j = spec.eval.judge
    return ChatClient(j.base_url, j.model, api_key_env=j.api_key_env, params={"temperature": 0.0, "max_tokens": 256})


def generate_runs(spec: CompareSpec, progress: bool = True) -> None:
    """Steps 3 and 4: answers of every model (teacher included), ROUGE, and the judge when configured."""
    gen = spec.eval.generate
    if gen is None:
        return
    models = {spec.teacher_dir: spec.teacher}
    models.update({spec.run_dir(v, s): str(spec.run_dir(v, s)) for v, s in spec.runs})
    client = _judge_client(spec) if spec.eval.judge else None
    for folder, model in models.items():
        label = "teacher" if folder == spec.teacher_dir else folder.name
        rouge, judged = {}, {}
        for name, data in spec.eval.data.items():
            answers = folder / "answers" / f"{name}.jsonl"
            answers.parent.mkdir(parents=True, exist_ok=True)
            print(f"compare: answers of {label} to {name}", flush=True)
            generate_file(model, data, answers, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                          limit=gen.limit, progress=progress)
            rouge[name] = {"data": data, "models": {label: rouge_scores(answers)}}
            if client is not None:
                summary = judge_file(answers, answers.with_suffix(".judge.jsonl"), client,
                                     concurrency=spec.eval.judge.concurrency, progress=progress)
                scores = {d.lower(): m for d, m in summary.means.items() if m is not None}
                judged[name] = {"data": data, "models": {label: {**scores, "valid": summary.valid,
                                                                 "total": summary.total}}}
        write_json_atomic(folder / "rouge.json", {"kind": "rouge", "datasets": rouge}, default=str)
        if judged:
            write_json_atomic(folder / "judge.json", {"kind": "judge", "judge": spec.eval.judge.model, "datasets": judged},
                              default=str)


def run_compare(spec: CompareSpec, evaluate: bool = True, progress: bool = True) -> Path:
    """All steps; returns the report's Markdown file (or the output folder when `evaluate` is false)."""
    train_runs(spec)
    if not evaluate:
        return Path(spec.out)
    evaluate_runs(spec, progress)
    generate_runs(spec, progress)
    folders = [spec.teacher_dir] + [spec.run_dir(v, s) for v, s in spec.runs]
    md, _ = build_report(folders, Path(spec.out) / "report", title=f"kdistill compare: {Path(spec.source).name}",
                         baseline=spec.baseline)
    return md
