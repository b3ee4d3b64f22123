"""`kdistill eval lm` diagnostics and the `kdistill report` comparison report (Markdown + self-contained HTML)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from kdistill.config import ModelConfig
from kdistill.data import encode_examples, load_examples
from kdistill.evaluation.lm import eval_vocab_size, lm_diagnostics
from kdistill.models import load_model, load_tokenizer

LIMIT = 12
MAX_LENGTH = 64


@pytest.fixture(scope="module", params=["causal", "t5"])
def pair(request, alpaca_small):
    paths = request.getfixturevalue("tiny_causal" if request.param == "causal" else "tiny_t5")
    tok = load_tokenizer(ModelConfig(name_or_path=paths["teacher"]))
    teacher = load_model(ModelConfig(name_or_path=paths["teacher"]))
    student = load_model(ModelConfig(name_or_path=paths["student"]))
    return request.param, tok, teacher, student, alpaca_small


def _reference(kind, tok, teacher, student, data):
    """Independent float64 computation, one example at a time (no padding), token-weighted."""
    seq2seq = kind == "t5"
    examples = load_examples(str(data), limit=LIMIT).examples
    rows, _ = encode_examples(examples, tok, max_length=MAX_LENGTH, is_encoder_decoder=seq2seq)
    vocab = len(tok)
    sums = dict(kl=0.0, rkl=0.0, agree=0, s_nll=0.0, t_nll=0.0, s_ent=0.0, t_ent=0.0)
    n = 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            outs = []
            for model in (teacher, student):
                if seq2seq:
                    logits = model(input_ids=ids, labels=labels).logits[0]
                    tgt = labels[0]
                else:
                    logits = model(input_ids=ids).logits[0, :-1]
                    tgt = labels[0, 1:]
                keep = tgt != -100
                outs.append((logits[keep][:, :vocab].double(), tgt[keep]))
            (lt, tgt), (ls, _) = outs
            lpt, lps = torch.log_softmax(lt, -1), torch.log_softmax(ls, -1)
            pt, ps = lpt.exp(), lps.exp()
            sums["kl"] += float((pt * (lpt - lps)).sum())
            sums["rkl"] += float((ps * (lps - lpt)).sum())
            sums["agree"] += int((lt.argmax(-1) == ls.argmax(-1)).sum())
            sums["t_nll"] += float(-lpt.gather(1, tgt[:, None]).sum())
            sums["s_nll"] += float(-lps.gather(1, tgt[:, None]).sum())
            sums["t_ent"] += float(-(pt * lpt).sum())
            sums["s_ent"] += float(-(ps * lps).sum())
            n += int(tgt.numel())
    return {k: v / n for k, v in sums.items()}, n, len(rows)


def test_lm_diagnostics_match_reference(pair):
    kind, tok, teacher, student, data = pair
    result = lm_diagnostics(teacher, {"self": teacher, "student": student}, tok, data, max_length=MAX_LENGTH,
                            batch_size=4, limit=LIMIT, progress=False)
    ref, n_tokens, n_rows = _reference(kind, tok, teacher, student, data)
    assert result["tokens"] == n_tokens and result["examples"] == n_rows
    assert eval_vocab_size(tok, teacher, {"student": student}) == len(tok)
    assert result["data"] == str(data) and result["skipped_invalid"] == 0

    same = result["students"]["self"]
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["top1_agreement"] == 1.0
    assert same["entropy_gap"] == pytest.approx(0.0, abs=1e-6)
    assert same["perplexity"] == pytest.approx(result["teacher"]["perplexity"], rel=1e-6)

    s = result["students"]["student"]
    rel = dict(rel=1e-4, abs=1e-5)
    assert s["kl"] == pytest.approx(ref["kl"], **rel)
    assert s["reverse_kl"] == pytest.approx(ref["rkl"], **rel)
    assert s["top1_agreement"] == pytest.approx(ref["agree"], abs=1.5 / n_tokens)
    assert s["nll"] == pytest.approx(ref["s_nll"], **rel)
    assert result["teacher"]["nll"] == pytest.approx(ref["t_nll"], **rel)
    assert s["perplexity"] == pytest.approx(math.exp(s["nll"]), rel=1e-12)
    assert s["perplexity"] == pytest.approx(math.exp(ref["s_nll"]), rel=1e-4)
    assert result["teacher"]["perplexity"] == pytest.approx(math.exp(ref["t_nll"]), rel=1e-4)
    assert s["entropy_gap"] == pytest.approx(ref["s_ent"] - ref["t_ent"], **rel)
    assert s["kl"] > 0 and s["reverse_kl"] > 0 and 0 <= s["top1_agreement"] < 1
    assert s["entropy_gap"] == pytest.approx(s["entropy"] - result["teacher"]["entropy"], rel=1e-9)
    assert s["perplexity"] > result["teacher"]["perplexity"]  # fine-tuned teacher vs untrained student

    # entropy gap sign: the teacher with its logits scaled by 0.5 is flatter (gap > 0), by 2 sharper (< 0)
    import copy

    scaled = {}
    for name, factor in (("flat", 0.5), ("sharp", 2.0)):
        model = copy.deepcopy(teacher)
        model.get_output_embeddings().register_forward_hook(lambda m, i, o, f=factor: o * f)
        scaled[name] = model
    signs = lm_diagnostics(teacher, scaled, tok, data, max_length=MAX_LENGTH, batch_size=4, limit=LIMIT,
                           progress=False)["students"]
    assert signs["flat"]["entropy_gap"] > 0 > signs["sharp"]["entropy_gap"]
    assert signs["flat"]["top1_agreement"] == 1.0 and signs["sharp"]["top1_agreement"] == 1.0

    other = lm_diagnostics(teacher, {"student": student}, tok, data, max_length=MAX_LENGTH, batch_size=1,
                           limit=LIMIT, progress=False)
    assert other["tokens"] == result["tokens"]
    for key, value in other["students"]["student"].items():
        assert value == pytest.approx(s[key], rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------------------------------------ report
def _fake_run(root: Path, name: str, losses: list[tuple[float, float, float]], kl: float, ppl: float,
              teacher_ppl: float, accuracy: float) -> Path:
    run = root / name
    run.mkdir()
    (run / "kdistill_config.yaml").write_text(
        "teacher:\n  name_or_path: org/teacher-7b\n"
        f"student:\n  name_or_path: org/{name}-0.5b\n"
        "objectives:\n  ce:\n    type: ce\n    weight: 0.5\n  kd:\n    type: kd\n    weight: 1.5\n"
        "    divergence: forward_kl\n"
        "training:\n  learning_rate: 0.0002\n  max_steps: 3\n")
    history = [{"step": i + 1, "loss": t, "loss/ce": ce, "loss/kd": kd} for i, (t, ce, kd) in enumerate(losses)]
    history.append({"step": len(losses), "eval_loss": losses[-1][0] + 0.25})
    (run / "kdistill_summary.json").write_text(json.dumps({"global_step": len(losses), "log_history": history}))
    (run / "lm.json").write_text(json.dumps({
        "kind": "lm", "tokens": 1234, "teacher": {"perplexity": teacher_ppl, "nll": math.log(teacher_ppl)},
        "students": {name: {"kl": kl, "top1_agreement": 0.5 + kl / 10, "perplexity": ppl}}}))
    (run / "classification.json").write_text(json.dumps({"accuracy": accuracy, "macro": {"f1": accuracy - 0.01}}))
    return run


@pytest.fixture()
def report_files(tmp_path):
    from kdistill.report import build_report

    a = _fake_run(tmp_path, "student-a", [(3.125, 2.5, 0.625), (2.75, 2.25, 0.5), (2.375, 2.0, 0.375)],
                  kl=0.4321, ppl=12.345, teacher_ppl=7.891, accuracy=0.8125)
    b = _fake_run(tmp_path, "student-b", [(4.0625, 3.0, 1.0625), (3.5, 2.75, 0.75), (3.25, 2.625, 0.625)],
                  kl=0.9876, ppl=23.456, teacher_ppl=7.891, accuracy=0.6875)
    md, page = build_report([a, b], tmp_path / "out", title="Two runs")
    return md, page


def _expected_numbers() -> list[str]:
    from kdistill.report import format_number as f

    return [f(x) for x in (0.4321, 12.345, 7.891, 0.8125, 0.8125 - 0.01, 2.375, 2.0, 0.375, 2.625,
                           0.9876, 23.456, 0.6875, 0.6875 - 0.01, 3.25, 0.625, 3.5, 0.5 + 0.4321 / 10)]


def test_report_markdown_and_html(report_files):
    md_path, html_path = report_files
    md, page = md_path.read_text(), html_path.read_text()
    for text in _expected_numbers():
        assert text in md, text
        assert text in page, text
    for text in (md, page):
        assert "student-a" in text and "student-b" in text and "org/teacher-7b" in text
        assert "kd x 1.5" in text and "ce x 0.5" in text and "learning_rate=0.0002" in text
    # teacher rows come first in the LM table
    lm_table = page[page.index("Results: lm"):]
    assert lm_table.index("student-a / teacher") < lm_table.index("student-a / student-a")
    assert lm_table.index("student-b / teacher") < lm_table.index("student-a / student-a")
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pngs) >= 3
    import base64
    for data in pngs:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"https?://", page)
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert (md_path.parent / "loss_curves.png").is_file() and "](loss_curves.png)" in md


def test_report_cli(tmp_path, report_files):
    import argparse

    from kdistill.report import add_parser, run_cli

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    run_dir = report_files[0].parents[1] / "student-a"
    args = parser.parse_args(["report", str(run_dir), "--out", str(tmp_path / "cli"), "--title", "One"])
    assert run_cli(args) == 0
    assert "12.3450" in (tmp_path / "cli" / "report.html").read_text()


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does it)")
def test_report_renders_in_headless_chromium(report_files, tmp_path):
    _, html_path = report_files
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
    dom = subprocess.run(base + [f"--user-data-dir={tmp_path / 'profile1'}", "--dump-dom",
                                 html_path.resolve().as_uri()],
                         capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<table" in dom.stdout
    for text in _expected_numbers():
        assert text in dom.stdout, text
    shot = tmp_path / "shot.png"
    run = subprocess.run(base + [f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
                                 "--window-size=1200,2000", "--hide-scrollbars", html_path.resolve().as_uri()],
                         capture_output=True, text=True, timeout=90)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    import matplotlib.image as mpimg
    import numpy as np

    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    pixels = mpimg.imread(str(shot))
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    rgb = pixels[..., :3].reshape(-1, 3)
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 50  # text, tables and charts, not blank


def test_model_and_tokenizer_files_are_not_reported_as_results(tmp_path):
    """A run folder is also a saved model: its config/tokenizer JSON files are not evaluation results."""
    from kdistill.report import build_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"hidden_size": 48, "vocab_size": 400}))
    (run / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"<|endoftext|>": 0}}}))
    (run / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 10 ** 30}))
    (run / "lm_eval.json").write_text(json.dumps({"kind": "lm", "accuracy": 0.8125}))
    md, _ = build_report([run], tmp_path / "out")
    text = md.read_text()
    assert "lm_eval" in text and "0.8125" in text
    assert "hidden_size" not in text and "endoftext" not in text and "model_max_length" not in text
