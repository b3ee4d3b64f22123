"""`kdistill report` as a comparison: seeds aggregated, models x datasets per metric, config differences,
provenance, log-scale perplexity (fake run folders in the shapes `kdistill train`, `eval lm`, `eval rouge`,
`kdistill cache` and `annotate --export` write; no model is loaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdistill.cli import main
from kdistill.errors import ConfigError
from kdistill.report import build_report
from kdistill.report_charts import metric_figure, results_figure
from kdistill.report_config import config_differences
from kdistill.report_data import CACHE_MANIFEST, find_runs, format_number, load_run
from kdistill.report_tables import format_cell, group_runs, strip_seed, summarize

DATASETS = ("alpaca", "dolly")
TEACHER_PPL = {"alpaca": 4.125, "dolly": 6.75}
# (method, seed) -> (perplexity, kl) per dataset; irregular numbers so that each mean and sd is distinct
VALUES = {
    ("fkl", 0): {"alpaca": (9.5, 0.3125), "dolly": (14.25, 0.4375)},
    ("fkl", 1): {"alpaca": (10.75, 0.28125), "dolly": (13.0, 0.5)},
    ("rkl", 0): {"alpaca": (11.0, 0.375), "dolly": (17.5, 0.625)},
    ("rkl", 1): {"alpaca": (12.5, 0.40625), "dolly": (16.25, 0.59375)},
}
ROUGE = {("fkl", 0): 31.25, ("fkl", 1): 33.5, ("rkl", 0): 28.0, ("rkl", 1): 27.5}


def _config(divergence: str, seed: int, cache_dir=None, data="train.jsonl") -> dict:
    return {"seed": seed, "task": "lm",
            "student": {"name_or_path": "org/student-0.5b", "dtype": "float32", "layers": None},
            "teacher": {"name_or_path": "org/teacher-7b", "dtype": "float32", "layers": None},
            "objectives": {"ce": {"type": "ce", "weight": 0.5, "view": ""},
                           "kd": {"type": "kd", "weight": 0.5, "divergence": divergence, "temperature": 1.0,
                                  "alpha": 0.1, "beta": 0.5, "missing": "bucket", "view": ""}},
            "data": {"train": data, "max_length": 256, "format": "auto", "template": "auto"},
            "cache": {"dir": cache_dir, "k": 64, "temperature": 1.0, "logprob_bits": 12},
            "lora": {"enabled": False, "r": 16, "alpha": 32},
            "training": {"output_dir": f"outputs/{divergence}-seed{seed}", "learning_rate": 0.0005,
                         "max_steps": 4, "per_device_train_batch_size": 2, "seed": seed}}


def _eval_lm(students: dict) -> dict:
    """The new `eval lm` shape: {dataset: {name: (ppl, kl)}}."""
    return {"kind": "lm", "max_length": 256, "vocab_size": 400, "teacher": {"path": "org/teacher-7b"},
            "datasets": {ds: {"data": f"data/{ds}.jsonl", "examples": 16, "tokens": 900 + i, "skipped_invalid": 0,
                              "dropped_no_target": 1, "truncated": 2,
                              "teacher": {"perplexity": TEACHER_PPL[ds], "nll": math.log(TEACHER_PPL[ds]),
                                          "entropy": 1.5},
                              "students": {name: {"kl": v[ds][1], "reverse_kl": v[ds][1] / 2, "top1_agreement": 0.5,
                                                  "perplexity": v[ds][0], "nll": math.log(v[ds][0]), "entropy": 1.75,
                                                  "entropy_gap": 0.25} for name, v in students.items()}}
                         for i, ds in enumerate(DATASETS)}}


def _rouge(models: dict) -> dict:
    return {"kind": "rouge", "datasets": {ds: {"models": {name: {"rouge1": r + i, "rouge2": r / 2, "rougeL": r - 1,
                                                                 "answers": 16, "empty_answers": 0, "no_reference": 0}
                                                          for name, r in models.items()}}
                                         for i, ds in enumerate(DATASETS)}}


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if path.suffix == ".yaml" else json.dumps(data))


@pytest.fixture()
def comparison(tmp_path) -> Path:
    """OUT/teacher + OUT/{fkl,rkl}-seed{0,1}, as the comparison command lays them out."""
    out = tmp_path / "OUT"
    _write(out / "teacher" / "eval_lm.json", _eval_lm({}))
    _write(out / "teacher" / "rouge.json", _rouge({"teacher": 40.0}))
    for (method, seed), values in VALUES.items():
        run = out / f"{method}-seed{seed}"
        _write(run / "kdistill_config.yaml", _config({"fkl": "forward_kl", "rkl": "reverse_kl"}[method], seed))
        # as `kdistill train` writes it: the Trainer's train_runtime is the last log_history entry
        _write(run / "kdistill_summary.json", {
            "log_history": [{"step": 2, "loss": 3.0, "loss/kd": 1.0},
                            {"step": 4, "loss": 2.0 + seed / 4, "loss/kd": 0.5 + seed / 8},
                            {"step": 4, "train_runtime": 20.0 + 3 * seed + (method == "rkl"), "train_loss": 2.5}]})
        _write(run / "eval_lm.json", _eval_lm({"student": values}))
        _write(run / "rouge.json", _rouge({f"{method}-seed{seed}": ROUGE[(method, seed)]}))
    return out


def _mean_sd(values):
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _stat_text(values) -> str:
    m, sd = _mean_sd(values)
    return f"{format_number(m)} ± {format_number(sd)} (n={len(values)})"


def test_two_methods_two_seeds_one_table_per_metric(comparison, tmp_path):
    md_path, html_path = build_report([comparison], tmp_path / "rep")
    report = json.loads((md_path.parent / "report.json").read_text())
    md, page = md_path.read_text(), html_path.read_text()
    assert [g["name"] for g in report["groups"]] == ["teacher", "fkl", "rkl"]
    assert [len(g["runs"]) for g in report["groups"]] == [1, 2, 2]
    tables = {t["title"]: t for t in report["tables"]}
    for metric in ("perplexity", "kl", "reverse_kl", "top1_agreement", "entropy_gap"):
        assert sum(t["metric"] == metric and t["kind"] == "lm" for t in report["tables"]) == 1, metric
    ppl = tables["lm: perplexity"]
    assert ppl["columns"] == list(DATASETS)
    assert [r["label"] for r in ppl["rows"]] == ["teacher", "fkl", "rkl"]  # the teacher once, first
    assert [r["label"] for r in tables["lm: kl"]["rows"]] == ["fkl", "rkl"]  # no teacher KL
    for ds in DATASETS:
        teacher = ppl["rows"][0]["cells"][ds]
        assert teacher["mean"] == TEACHER_PPL[ds] and teacher["n"] == 1  # 5 files hold it: one measurement
        for row, method in zip(ppl["rows"][1:], ("fkl", "rkl")):
            for column, table in ((0, ppl), (1, tables["lm: kl"])):
                values = [VALUES[(method, s)][ds][column] for s in (0, 1)]
                cell = next(r for r in table["rows"] if r["label"] == method)["cells"][ds]
                m, sd = _mean_sd(values)
                assert cell["mean"] == pytest.approx(m) and cell["sd"] == pytest.approx(sd)
                assert (cell["n"], cell["min"], cell["max"]) == (2, min(values), max(values))
                assert _stat_text(values) in md and _stat_text(values) in page
    rouge = tables["rouge: rougeL"]
    assert [r["label"] for r in rouge["rows"]] == ["teacher", "fkl", "rkl"]
    assert _stat_text([ROUGE[("rkl", s)] + 1 for s in (0, 1)]) in md  # rouge1 on dolly: r + 1
    # one markdown table per metric, the teacher row once in it
    section = md[md.index("### lm: perplexity"):md.index("### lm: kl")]
    assert section.count("**teacher**") == 1 and "| model | alpaca | dolly |" in section
    # training: steps, wall time, final loss terms, aggregated
    training = tables["Training"]
    assert {"steps", "train time (s)", "final loss", "final loss/kd"} <= set(training["columns"])
    assert _stat_text([21.0, 24.0]) in md  # rkl train_runtime
    assert _stat_text([0.5, 0.625]) in md  # final loss/kd of either method
    assert "| fkl | 4 ± 0.0000 (n=2)" in md


def test_config_differences_show_what_differs_only(comparison, tmp_path):
    cached = tmp_path / "fkl-cached"
    _write(cached / "kdistill_config.yaml", _config("forward_kl", 0, cache_dir="cache/top64"))
    groups = group_runs([load_run(p, n) for p, n in find_runs([comparison, cached])])
    diffs = config_differences(groups)
    assert diffs["teacher"] == []
    seeds = {"seed": "0, 1", "training.seed": "0, 1"}
    assert dict(diffs["fkl"]) == {"cache.dir": "null", "objectives.kd.divergence": "forward_kl", **seeds}
    assert dict(diffs["rkl"]) == {"cache.dir": "null", "objectives.kd.divergence": "reverse_kl", **seeds}
    assert dict(diffs["fkl-cached"]) == {"cache.dir": "cache/top64", "objectives.kd.divergence": "forward_kl",
                                         "seed": "0", "training.seed": "0"}
    # two seeds of one method, nothing else: only the seed
    two = group_runs([load_run(p, n) for p, n in find_runs([comparison / "rkl-seed0", comparison / "rkl-seed1"])])
    assert len(two) == 1 and config_differences(two) == {"rkl": [("seed", "0, 1"), ("training.seed", "0, 1")]}

    md_path, _ = build_report([comparison], tmp_path / "rep")
    md = md_path.read_text()
    config = md[md.index("## Configuration"):md.index("## Charts")]
    common = config[config.index("### Common settings"):config.index("### teacher")]
    assert "org/teacher-7b" in common and "learning_rate=0.0005" in common
    per_group = config[config.index("### fkl"):]
    assert "objectives.kd.divergence**: forward_kl" in per_group and "reverse_kl" in per_group
    for unrelated in ("learning_rate", "max_length", "alpha", "logprob_bits", "output_dir", "lora"):
        assert unrelated not in per_group, unrelated


def test_a_section_only_some_runs_have_is_one_line(tmp_path):
    with_kd, ce_only = tmp_path / "kd", tmp_path / "ce"
    _write(with_kd / "kdistill_config.yaml", _config("forward_kl", 0))
    config = _config("forward_kl", 0)
    del config["objectives"]["kd"]
    _write(ce_only / "kdistill_config.yaml", config)
    diffs = config_differences(group_runs([load_run(with_kd), load_run(ce_only)]))
    assert diffs["ce"] == [("objectives.kd", "(not set)")]
    assert diffs["kd"] == [("objectives.kd", "alpha=0.1, beta=0.5, divergence=forward_kl, missing=bucket, "
                                             "temperature=1.0, type=kd, view=, weight=0.5")]


def test_perplexity_is_drawn_on_a_log_axis(comparison, tmp_path):
    build_report([comparison], tmp_path / "rep")
    tables = {t["title"]: t for t in json.loads((tmp_path / "rep" / "report.json").read_text())["tables"]}
    ppl = metric_figure(tables["lm: perplexity"])
    kl = metric_figure(tables["lm: kl"])
    assert [ax.get_yscale() for ax in ppl.axes] == ["log"] and [ax.get_yscale() for ax in kl.axes] == ["linear"]
    # error bars: one per model and dataset, as long as the sd
    ax = kl.axes[0]
    caps = [c for c in ax.containers if hasattr(c, "lines") and c.lines[2]]
    segments = np.concatenate([c.lines[2][0].get_segments() for c in caps])
    fkl_sd = _mean_sd([VALUES[("fkl", s)]["alpaca"][1] for s in (0, 1)])[1]
    lengths = sorted(round(float(s[1][1] - s[0][1]) / 2, 9) for s in segments)
    assert len(segments) == 4 and round(fkl_sd, 9) in lengths
    # old-shape results: a perplexity column gets its own log panel
    old = {"title": "Results: lm", "columns": ["perplexity", "kl"], "rows": [
        {"label": "a", "teacher": False, "cells": {"perplexity": summarize([12.0]), "kl": summarize([0.5])}}]}
    assert [ax.get_yscale() for ax in results_figure(old).axes[:2]] == ["log", "linear"]


def test_provenance_from_cache_manifest_and_annotation_stats(tmp_path):
    from kdistill.teachers.topk_codec import TopKCodec
    from kdistill.teachers.topk_store import MANIFEST_NAME
    from kdistill.teachers.topk_writer import TopKStoreWriter

    assert CACHE_MANIFEST == MANIFEST_NAME
    codec = TopKCodec(vocab_size=400, k=8)
    meta = {"teacher": {"name_or_path": "org/teacher-7b", "revision": None, "dtype": "float32"},
            "capture_temperature": 2.0, "split": "train"}
    with TopKStoreWriter(tmp_path / "cache" / "train", meta, codec) as writer:
        ids = np.tile(np.arange(8), (3, 1))
        writer.append(0, "h0", ids, np.full((3, 8), -2.0, dtype=np.float32))
        writer.close(stats={"examples": 1, "tokens": 3, "k": 8, "kl_mean": 0.01875, "kl_sample_tokens": 3,
                            "bytes_per_token": 61.5}, num_examples=1)
    _write(tmp_path / "data" / "seqkd.jsonl.stats.json", {
        "teacher": "org/teacher-7b", "task": "output", "params": {"temperature": 0.7, "max_new_tokens": 64},
        "rows": 20, "ok": 18, "failed": 1, "unparsable": 1,
        "answers": {"count": 18, "distinct_ratio": 0.8125, "mean_words": 42.5, "empty_fraction": 0.0,
                    "repeated_4gram_fraction": 0.0625, "degenerate": True, "reasons": ["too many repeats"]}})
    run = tmp_path / "runs" / "fkl-cached-seed0"
    _write(run / "kdistill_config.yaml", _config("forward_kl", 0, cache_dir=str(tmp_path / "cache"),
                                                 data=str(tmp_path / "data" / "seqkd.jsonl")))
    md_path, _ = build_report([tmp_path / "runs"], tmp_path / "rep")
    md = md_path.read_text()
    prov = md[md.index("## Provenance"):]
    for text in ("k 8", "captured at temperature 2.0000", "61.5000 bytes/token",
                 f"mean reconstruction KL {format_number(0.01875)}",
                 "teacher org/teacher-7b, task output", "rows 20, ok 18, failed 1, unparsable 1",
                 "distinct_ratio 0.8125", "mean_words 42.5000", "repeated_4gram_fraction 0.0625",
                 "YES: too many repeats", "temperature=0.7"):
        assert text in prov, text
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["groups"][0]["name"] == "fkl-cached"
    cache = report["groups"][0]["provenance"][0]["cache"]
    assert cache["found"] and cache["splits"][0]["k"] == 8 and cache["splits"][0]["capture_temperature"] == 2.0


def test_baseline_adds_differences_and_an_unknown_one_is_refused(comparison, tmp_path, capsys):
    build_report([comparison], tmp_path / "rep", baseline="fkl")
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    diff = next(t for t in report["tables"] if t["title"] == "lm: perplexity: difference to fkl")
    rkl = next(r for r in diff["rows"] if r["label"] == "rkl")
    for ds in DATASETS:
        expected = (_mean_sd([VALUES[("rkl", s)][ds][0] for s in (0, 1)])[0]
                    - _mean_sd([VALUES[("fkl", s)][ds][0] for s in (0, 1)])[0])
        assert rkl["cells"][ds]["difference"] == pytest.approx(expected)
        assert "+" + format_number(expected) in (tmp_path / "rep" / "report.md").read_text()
    assert "fkl" not in [r["label"] for r in diff["rows"]]
    with pytest.raises(ConfigError, match="--baseline 'nope'.*fkl, rkl"):
        build_report([comparison], tmp_path / "rep2", baseline="nope")
    assert main(["report", str(comparison), "--out", str(tmp_path / "rep3"), "--baseline", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--baseline 'nope'" in err and not (tmp_path / "rep3").exists()


def test_group_names_and_runs_without_config(tmp_path):
    assert [strip_seed(n) for n in ("ce-seed0", "ce_seed1", "ce-s2", "ce/seed0", "kd-seed=3", "seed0", "t5-small")] \
        == ["ce", "ce", "ce", "ce", "kd", "seed0", "t5-small"]
    for name in ("a-seed0", "b-seed1"):  # same config, names that do not agree: the first name
        _write(tmp_path / "x" / name / "kdistill_config.yaml", _config("forward_kl", int(name[-1])))
    for name in ("seed0", "seed1"):  # OUT/method/seedN, two levels down
        _write(tmp_path / "y" / "rkl" / name / "kdistill_config.yaml", _config("reverse_kl", int(name[-1])))
    for name in ("plain-seed0", "plain-seed1"):  # no config: a group each
        _write(tmp_path / "z" / name / "sts.json", {"spearman": 0.5})
    runs = [load_run(p, n) for p, n in find_runs([tmp_path / "x", tmp_path / "y", tmp_path / "z"])]
    assert [r["name"] for r in runs] == ["a-seed0", "b-seed1", "rkl/seed0", "rkl/seed1", "plain-seed0",
                                         "plain-seed1"]
    groups = group_runs(runs)
    assert [(g["name"], len(g["runs"])) for g in groups] == [("a-seed0", 2), ("rkl", 2), ("plain-seed0", 1),
                                                             ("plain-seed1", 1)]
    # a seed folder given directly is named with its parent
    assert find_runs([tmp_path / "y" / "rkl" / "seed1"])[0][1] == "rkl/seed1"


def test_new_and_old_result_shapes_render_together(comparison, tmp_path):
    old = tmp_path / "old-run"
    _write(old / "lm.json", {"kind": "lm", "teacher": {"perplexity": 7.875}, "data": "x.jsonl",
                             "students": {"s": {"kl": 0.6875, "perplexity": 15.5}}})
    _write(old / "classify_sst2.json", {"accuracy": 0.8125, "macro": {"f1": 0.796875}})
    md_path, html_path = build_report([comparison, old], tmp_path / "rep")
    md = md_path.read_text()
    assert "### Results: lm" in md and "| **old-run / teacher** | 7.8750" in md and "old-run / s" in md
    assert "### Results: classify_sst2" in md and "0.7969" in md
    assert "### lm: perplexity" in md  # the new shape keeps its own per-metric tables
    assert format_cell({"mean": 2.5, "sd": 0.125, "n": 3}) == "2.5000 ± 0.1250 (n=3)"
    assert format_cell({"mean": 7, "sd": None, "n": 1}) == "7"


def test_unreadable_config_names_the_file(tmp_path, capsys):
    run = tmp_path / "broken"
    run.mkdir()
    (run / "kdistill_config.yaml").write_text("seed: [1,\n")
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kdistill_config.yaml: not a readable YAML config" in err
