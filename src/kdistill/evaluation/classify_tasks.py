"""Classification tasks and their metrics: what `kdistill eval classify` scores (built-in Climate-FEVER and hate
speech, or a custom labelled file), and accuracy / per-class and macro F1 in pure Python (they match scikit-learn
with ``labels=labels``, an invalid prediction counting as a prediction outside ``labels``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from kdistill.bundled import HATE_SPEECH, bundled_path
from kdistill.data.io import iter_json_lines, load_hub_dataset, looks_local, malformed_json
from kdistill.errors import MissingFileError, UserError

__all__ = ["CLIMATE_FEVER_HUB", "DEFAULT_DATA", "Examples", "N_EXAMPLES_KEPT", "Task", "classification_metrics",
           "climate_fever_task", "custom_task", "get_task", "hate_speech_task"]

CLIMATE_FEVER_HUB = "tdiggelm/climate_fever"  # the claims file of Diggelmann et al. 2020; one split, "test"
DEFAULT_DATA = {
    "climate_fever": f"{CLIMATE_FEVER_HUB} (hub, split test; no license stated, so kdistill does not ship it)",
    "hate_speech": f"{HATE_SPEECH} (shipped: 200 hate + 200 noHate Stormfront sentences, CC BY-SA 3.0)",
}
N_EXAMPLES_KEPT = 20


# ----------------------------------------------------------------------------------------------------
# metrics


def classification_metrics(golds: Sequence[str], preds: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class P/R/F1/support and the confusion matrix.

    ``preds`` entries that are ``None`` are invalid: they count as wrong (in accuracy and in the recall of
    their gold class), are left out of the confusion matrix and reported as ``invalid``. A prediction that
    is not in ``labels`` counts the same way. Precision/recall/F1 of a class with no prediction / no
    support is 0. The confusion matrix has rows = gold, columns = predicted, both in ``labels`` order.
    """
    labels = list(labels)
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"labels must be non-empty and distinct, got {labels!r}")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({str(g) for g in golds if g not in index})
    if unknown:
        raise ValueError(f"gold labels not in labels: {unknown}")
    k = len(labels)
    matrix = [[0] * k for _ in range(k)]
    invalid = correct = 0
    for gold, pred in zip(golds, preds):
        if pred is None or pred not in index:
            invalid += 1
            continue
        matrix[index[gold]][index[pred]] += 1
        correct += gold == pred
    n = len(golds)
    per_class = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        predicted = sum(matrix[r][i] for r in range(k))
        support = sum(1 for g in golds if g == label)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / k,
        "per_class": per_class,
        "labels": labels,
        "confusion_matrix": matrix,
        "invalid": invalid,
    }


# ----------------------------------------------------------------------------------------------------
# tasks


class Examples(list):
    """A list of ``(fields, gold_label)`` with ``excluded``: {reason or label: count} of rows left out."""

    def __init__(self, items=(), excluded: dict | None = None):
        super().__init__(items)
        self.excluded = dict(excluded or {})


@dataclass
class Task:
    """A classification task: labels, what the model scores/produces for each, and the prompt.

    ``template`` is filled with ``str.format(**fields, labels=...)`` where ``labels`` is the verbalisers
    joined by ", " (so a template can list the choices). ``answer_prefix`` goes between the prompt and a
    verbaliser in log-likelihood scoring (a space: the prompt ends with e.g. "Answer:").
    """

    name: str
    labels: list[str]
    verbalizers: dict[str, str]
    template: str
    text_fields: list[str]
    label_field: str
    default_data: str | None = None  # a local file or a hub dataset id
    default_split: str = "test"       # when the data is a hub id
    label_map: dict[str, str] = field(default_factory=dict)  # raw label in the file -> task label
    answer_prefix: str = " "

    def __post_init__(self):
        self.labels = list(self.labels)
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"a task needs at least two distinct labels, got {self.labels!r}")
        missing = [label for label in self.labels if not self.verbalizers.get(label)]
        if missing:
            raise ValueError(f"no verbalizer for labels {missing}")
        verbs = [self.verbalizers[label] for label in self.labels]
        if len(set(verbs)) != len(verbs):
            raise ValueError(f"verbalizers must be distinct, got {verbs!r}")

    def prompt(self, fields: dict) -> str:
        choices = ", ".join(self.verbalizers[label] for label in self.labels)
        return self.template.format(**{**fields, "labels": choices})

    def load(self, path: str | Path | None = None, limit: int | None = None, split: str | None = None) -> Examples:
        """Rows of a JSONL file or a hub dataset (``split``, default ``default_split``; class-label columns read as
        their names) as ``(fields, gold)``; rows whose label is not a task label are excluded (counted by raw label
        in ``.excluded``), as are rows missing a text field (``"missing_text"``). With ``limit`` reading stops at
        ``limit`` kept rows, so ``excluded`` then counts only the rows read so far."""
        source = str(path or self.default_data or "")
        if Path(source).expanduser().is_file():
            rows = _jsonl_rows(Path(source).expanduser())
        elif source and (Path(source).is_dir() or not looks_local(source)):
            rows = _hub_rows(source, split or self.default_split)
        else:
            raise MissingFileError(f"{self.name}: data file not found: {source!r}")
        items, excluded = [], Counter()
        for row in rows:
            raw = row.get(self.label_field)
            gold = self.label_map.get(raw, raw) if isinstance(raw, str) else None
            if gold not in self.labels:
                excluded[str(raw)] += 1
                continue
            fields = {name: row.get(name) for name in self.text_fields}
            if any(not isinstance(v, str) or not v.strip() for v in fields.values()):
                excluded["missing_text"] += 1
                continue
            items.append((fields, gold))
            if limit is not None and len(items) >= limit:
                break
        return Examples(items, dict(excluded))


def _jsonl_rows(path: Path):
    with path.open(encoding="utf-8") as fh:
        for location, row, error in iter_json_lines(fh, str(path)):
            if error is not None:
                raise UserError(malformed_json(location, error))
            if not isinstance(row, dict):
                raise UserError(f"{location}: expected a JSON object, found {type(row).__name__}")
            yield row


def _hub_rows(source: str, split: str):
    import datasets

    dataset = load_hub_dataset(source, split, option="--data")
    names = {name: feature.int2str for name, feature in dataset.features.items()
             if isinstance(feature, datasets.ClassLabel)}
    for row in dataset:
        yield {k: names[k](v) if k in names and isinstance(v, int) and v >= 0 else v for k, v in row.items()}


CLIMATE_VERBALIZERS = {"SUPPORTS": "supported", "REFUTES": "refuted", "NOT_ENOUGH_INFO": "not enough info",
                       "DISPUTED": "disputed"}


def climate_fever_task(all_labels: bool = False) -> Task:
    """Claim-level Climate-FEVER: SUPPORTS vs REFUTES (the other labels excluded), or all four."""
    labels = list(CLIMATE_VERBALIZERS) if all_labels else ["SUPPORTS", "REFUTES"]
    return Task(
        name="climate_fever", labels=labels, verbalizers={k: CLIMATE_VERBALIZERS[k] for k in labels},
        template=("Claim: {claim}\nIs this claim about climate supported or refuted by scientific evidence? "
                  "Answer with one of: {labels}.\nAnswer:"),
        text_fields=["claim"], label_field="claim_label", default_data=CLIMATE_FEVER_HUB)


def hate_speech_task() -> Task:
    """Stormfront sentences: hate vs noHate."""
    return Task(
        name="hate_speech", labels=["hate", "noHate"], verbalizers={"hate": "hate", "noHate": "not hate"},
        template=("Text: {text}\nIs this text hate speech? Answer with one of: {labels}.\nAnswer:"),
        text_fields=["text"], label_field="label", default_data=bundled_path(HATE_SPEECH))


def custom_task(labels: Sequence[str] | str, template: str | None = None, text_field: str = "text",
                label_field: str = "label", verbalizers: dict[str, str] | None = None,
                name: str = "custom") -> Task:
    """A task from arguments; ``labels`` a list or a comma-separated string; verbalisers default to the
    labels; the default template is ``"Text: {<text_field>}\\nAnswer with one of: {labels}.\\nAnswer:"``."""
    if isinstance(labels, str):
        labels = [s.strip() for s in labels.split(",") if s.strip()]
    labels = list(labels)
    if template is None:
        template = "Text: {" + text_field + "}\nAnswer with one of: {labels}.\nAnswer:"
    text_fields = []
    for _, fname, _, _ in __import__("string").Formatter().parse(template):
        if fname and fname != "labels":
            base = fname.split(".")[0].split("[")[0]
            if base not in text_fields:
                text_fields.append(base)
    if not text_fields:
        raise ValueError(f"the template names no field of the rows: {template!r}")
    return Task(name=name, labels=labels, verbalizers=dict(verbalizers or {l: l for l in labels}),
                template=template, text_fields=text_fields, label_field=label_field)


def get_task(name: str, all_labels: bool = False, **custom) -> Task:
    if name == "climate_fever":
        return climate_fever_task(all_labels=all_labels)
    if name == "hate_speech":
        return hate_speech_task()
    if name == "custom":
        return custom_task(**custom)
    raise ValueError(f"unknown task {name!r}: climate_fever, hate_speech or custom")


# ----------------------------------------------------------------------------------------------------
# scorers
