"""`kdistill compare`: the spec (checked whole, file:line errors), and an end-to-end comparison of two methods x two
seeds on the tiny pair: every run trained with the same budget, evaluated on two held-out sets with the teacher,
answered and scored with ROUGE, and one report with means, spreads and differences to the baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdistill.compare import load_spec, run_compare
from kdistill.compare.spec import variant_overrides
from kdistill.config import load_config
from kdistill.errors import ConfigError, MissingFileError

from conftest import run_config


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture()
def base(tmp_path, alpaca_small, tiny_causal) -> Path:
    cfg = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path / "unused",
                     max_steps=3)
    cfg["objectives"] = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "divergence": "forward_kl"}}
    return _write(tmp_path / "base.yaml", cfg)


def _spec(tmp_path, base, heldout, **extra) -> dict:
    spec = {"base": str(base), "out": str(tmp_path / "cmp"), "seeds": [0, 1], "baseline": "ce",
            "variants": {"ce": {"objectives": {"ce": {"weight": 1.0}}},
                         "rkl": {"objectives.kd.divergence": "reverse_kl"}},
            "eval": {"data": heldout}}
    spec.update(extra)
    return spec


def test_variant_overrides_replace_objectives_and_merge_sections():
    where = lambda k: k  # noqa: E731
    got = variant_overrides({"objectives": {"ce": {"weight": 1.0}}, "training": {"learning_rate": 1e-4},
                             "objectives.kd.divergence": "jsd"}, where)
    assert got == ['objectives={"ce": {"weight": 1.0}}', "training.learning_rate=0.0001",
                   'objectives.kd.divergence="jsd"']
    with pytest.raises(ConfigError, match="set by the comparison"):
        variant_overrides({"seed": 3}, where)


def test_variant_overrides_reach_the_config(tmp_path, base):
    cfg = load_config(base, variant_overrides({"objectives": {"ce": {"weight": 1.0}}}, str))
    assert list(cfg.objectives) == ["ce"] and cfg.objectives["ce"].weight == 1.0
    cfg = load_config(base, variant_overrides({"objectives.kd.divergence": "reverse_kl"}, str))
    assert cfg.objectives["kd"].divergence == "reverse_kl" and cfg.objectives["ce"].weight == 0.5


@pytest.mark.parametrize("change, message", [
    ({"baseline": "nope"}, r"compare.yaml:\d+: baseline: 'nope' is not a variant"),
    ({"seeds": [0, 0]}, r"compare.yaml:\d+: seeds: repeated seed"),
    ({"variants": {"teacher": {}}}, r"compare.yaml:\d+: variants.teacher: a variant name"),
    ({"variants": {"a": {"seed": 1}}}, r"compare.yaml:\d+: variants.a.seed: set by the comparison"),
    ({"eval": {"data": ["missing.jsonl"]}}, r"compare.yaml:\d+: eval.data.missing: file not found"),
    ({"eval": {"data": ["x.jsonl"], "judge": {"base_url": "http://x/v1", "model": "m"}}},
     r"eval.judge: the judge scores generated answers; add eval.generate"),
    ({"surprise": 1}, r"compare.yaml:\d+: surprise: unknown key"),
])
def test_bad_specs_name_the_line(tmp_path, base, change, message):
    (tmp_path / "x.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    spec = _spec(tmp_path, base, [str(tmp_path / "x.jsonl")], **change)
    path = _write(tmp_path / "compare.yaml", spec)
    with pytest.raises((ConfigError, MissingFileError), match=message):
        load_spec(path)


def test_a_comparison_without_a_teacher_is_refused_before_anything_trains(tmp_path, base):
    raw = yaml.safe_load(base.read_text())
    del raw["teacher"]
    raw["objectives"] = {"ce": {"weight": 1.0}}
    _write(base, raw)
    (tmp_path / "x.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    spec = _spec(tmp_path, base, [str(tmp_path / "x.jsonl")])
    spec["variants"] = {"ce": {}}
    path = _write(tmp_path / "compare.yaml", spec)
    with pytest.raises(ConfigError, match=r"compare.yaml: teacher: the base config has no teacher"):
        load_spec(path)
    spec["teacher"] = str(base.parent / "somewhere")
    _write(path, spec)
    loaded = load_spec(path)
    assert loaded.teacher == str(base.parent / "somewhere") and loaded.eval.max_length == 64


def test_spec_reads_relative_paths_from_beside_it(tmp_path, base, monkeypatch):
    (tmp_path / "held.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    path = _write(tmp_path / "compare.yaml", _spec(tmp_path, "base.yaml", ["held.jsonl"]))
    monkeypatch.chdir(tmp_path.parent)
    spec = load_spec(path)
    assert spec.base == str(tmp_path / "base.yaml")
    assert spec.eval.data == {"held": str(tmp_path / "held.jsonl")}
    assert spec.runs == [("ce", 0), ("ce", 1), ("rkl", 0), ("rkl", 1)]


@pytest.mark.slow
def test_compare_end_to_end(tmp_path, base, alpaca_small, capsys):
    rows = [json.loads(line) for line in alpaca_small.read_text().splitlines()]
    held_a = tmp_path / "held_a.jsonl"
    held_a.write_text("".join(json.dumps(r) + "\n" for r in rows[-12:]))
    held_b = tmp_path / "held_b.jsonl"
    held_b.write_text("".join(json.dumps(r) + "\n" for r in rows[-24:-12]))
    spec = _spec(tmp_path, base, {"a": str(held_a), "b": str(held_b)})
    spec["eval"]["generate"] = {"limit": 3, "max_new_tokens": 8}
    path = _write(tmp_path / "compare.yaml", spec)
    report = run_compare(load_spec(path), progress=False)

    out = tmp_path / "cmp"
    for name in ("ce-seed0", "ce-seed1", "rkl-seed0", "rkl-seed1"):
        run = out / name
        saved = yaml.safe_load((run / "kdistill_config.yaml").read_text())
        assert saved["seed"] == int(name[-1])
        assert saved["training"]["max_steps"] == 3  # the base's budget, for every variant
        assert list(saved["objectives"]) == (["ce"] if name.startswith("ce") else ["ce", "kd"])
        ev = json.loads((run / "eval_lm.json").read_text())
        assert set(ev["datasets"]) == {"a", "b"}
        assert list(ev["datasets"]["a"]["students"]) == [name]
        rouge = json.loads((run / "rouge.json").read_text())
        assert rouge["datasets"]["a"]["models"][name]["answers"] == 3
    teacher = json.loads((out / "teacher" / "eval_lm.json").read_text())
    assert teacher["datasets"]["a"]["students"] == {}
    # seeds differ, so the students differ
    s0 = json.loads((out / "ce-seed0" / "eval_lm.json").read_text())["datasets"]["a"]["students"]["ce-seed0"]
    s1 = json.loads((out / "ce-seed1" / "eval_lm.json").read_text())["datasets"]["a"]["students"]["ce-seed1"]
    assert s0["kl"] != s1["kl"]

    text = Path(report).read_text()
    mean = (s0["perplexity"] + s1["perplexity"]) / 2
    assert "±" in text and f"{mean:.4f}"[:5] in text

    # a rerun keeps finished runs (nothing retrained) ...
    before = (out / "ce-seed0" / "kdistill_summary.json").stat().st_mtime
    run_compare(load_spec(path), evaluate=False)
    assert (out / "ce-seed0" / "kdistill_summary.json").stat().st_mtime == before
    # ... and a spec that now asks for other settings in a finished run's folder is refused
    spec["variants"]["ce"] = {"objectives": {"ce": {"weight": 2.0}}}
    _write(path, spec)
    with pytest.raises(ConfigError, match="holds a finished run with other settings"):
        run_compare(load_spec(path), evaluate=False)
