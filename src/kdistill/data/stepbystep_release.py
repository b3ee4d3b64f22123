"""Convert the original "distilling step-by-step" data release into rows for :mod:`kdistill.data.stepbystep`.

The release is ``datasets.zip`` of https://github.com/google-research/distilling-step-by-step; unzipped,
every dataset is a folder ``datasets/<name>/`` (``<name>``: ``cqa``, ``svamp``, ``esnli``, ``anli1`` =
ANLI round 1) holding::

    <name>_<split>.json         the split's input rows (split: train, valid, test; JSON Lines or a JSON array)
    llm/<split>_CoT_<k>.json    k = 0, 1, 2, ...: a JSON array of raw PaLM few-shot chain-of-thought completions

Rule: the ``llm/<split>_CoT_<k>.json`` files of a split, concatenated in numeric order of ``k`` (..., 9, 10,
not 1, 10, 2), hold exactly one completion per row of the split, in row order; every file but the last holds
one batch (CQA 1000, SVAMP 500, e-SNLI 5500, ANLI 5000). ``svamp/SVAMP.json`` (the source problems) is no split.

Each output row (``OUT_DIR/<name>_<split>.jsonl``) is the input row unchanged plus ``palm_output`` (the raw
completion) and ``palm_rationale`` / ``palm_label``, read by :func:`kdistill.annotate.parse_rationale`
(free-form answers for CQA and SVAMP; for e-SNLI / ANLI the answer must name one of entailment / neutral /
contradiction). NLI completions go on with further few-shot examples that start with a ``Premise:`` line, so
they are cut there first, and e-SNLI completions end with an ``Answer: <label>`` line instead of "So the
answer is <label>", which is read as that sentence. An output without a usable answer gets ``""`` for both
(:func:`~kdistill.data.stepbystep.load_stepbystep` reads empty as missing). Without an ``llm`` folder the rows
are written without palm fields (enough for ``label_type: gt``).

Errors: a completion count that differs from the row count, a gap in ``k``, a split without completion
files (while ``llm/`` exists) and malformed JSON (``file:line: reason``) raise
:class:`~kdistill.data.records.DataValidationError`; missing files raise ``FileNotFoundError``. Each output is
written to ``*.tmp`` and renamed, so a failed run leaves no partial file.

Command::

    python -m kdistill.data.stepbystep_release datasets/cqa data/stepbystep [--dataset cqa] [--splits train,test]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..annotate import parse_rationale
from ..errors import MissingFileError
from .io import DataValidationError, read_json, read_rows
from .stepbystep import NLI_LABELS

__all__ = ["RELEASE_DATASETS", "SPLITS", "SplitSummary", "convert", "main", "parse_output"]

RELEASE_DATASETS = ("cqa", "svamp", "esnli", "anli")
SPLITS = ("train", "valid", "test")
_COT_FILE = re.compile(r"^([A-Za-z]+)_CoT_(\d+)\.json$")
_NLI_CONTINUATION = re.compile(r"(?m)^[ \t]*Premise[ \t]*:")
_ESNLI_ANSWER = re.compile(r"(?m)^[ \t]*Answer[ \t]*:")


@dataclass(frozen=True)
class SplitSummary:
    """One converted split: ``path`` written, ``rows``, rows ``with_label`` (non-empty ``palm_label``),
    ``unparsable`` completions; ``has_llm`` is false when no palm fields were written."""

    split: str
    path: Path
    rows: int
    with_label: int
    unparsable: int
    has_llm: bool


def parse_output(text: str, dataset: str) -> tuple[str, str]:
    """``(rationale, label)`` of one raw PaLM completion of ``dataset``; ``("", "")`` when unparsable."""
    labels = None
    if dataset in ("esnli", "anli"):
        cut = _NLI_CONTINUATION.search(text)
        text = text[:cut.start()] if cut else text
        if dataset == "esnli":
            text = _ESNLI_ANSWER.sub("So the answer is", text)
        labels = NLI_LABELS
    parsed = parse_rationale(text, labels)
    return parsed if parsed is not None else ("", "")


def _dataset_of(name: str) -> str:
    base = name.rstrip("0123456789")
    if base not in RELEASE_DATASETS:
        raise ValueError(f"cannot tell the dataset from the folder name {name!r}; pass --dataset "
                         f"({'|'.join(RELEASE_DATASETS)})")
    return base


def _split_file(folder: Path, name: str, split: str) -> Path | None:
    for suffix in (".json", ".jsonl"):
        if (folder / f"{name}_{split}{suffix}").is_file():
            return folder / f"{name}_{split}{suffix}"
    return None


def _completions(llm: Path, split: str, n_rows: int, split_path: Path) -> list[str]:
    """The split's completions, checked against its row count."""
    ks = sorted(int(m.group(2)) for m in map(_COT_FILE.match, os.listdir(llm)) if m and m.group(1) == split)
    if not ks:
        raise DataValidationError([f"{llm}: no {split}_CoT_<k>.json files for the {n_rows} rows of {split_path}"])
    if ks != list(range(len(ks))):
        gaps = sorted(set(range(ks[-1] + 1)) - set(ks))
        raise DataValidationError([f"{llm}: {split}_CoT_<k>.json files are not numbered 0..{ks[-1]} without gaps; "
                                   f"missing k = {', '.join(map(str, gaps))}"])
    outputs: list[str] = []
    for k in ks:
        path = llm / f"{split}_CoT_{k}.json"
        batch = read_json(path)
        if not isinstance(batch, list):
            raise DataValidationError([f"{path}:1: expected a JSON array of completion strings"])
        bad = [i for i, text in enumerate(batch) if not isinstance(text, str)]
        if bad:
            raise DataValidationError([f"{path}: element {i} is not a string" for i in bad])
        outputs += batch
    if len(outputs) != n_rows:
        files = f"{split}_CoT_{ks[0]}.json" + (f" .. {split}_CoT_{ks[-1]}.json" if len(ks) > 1 else "")
        raise DataValidationError([f"{llm}/{files} ({len(ks)} file(s)) hold {len(outputs)} completions but "
                                   f"{split_path} has {n_rows} rows; they must match one to one"])
    return outputs


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, dataset: str | None = None,
            splits: list[str] | tuple[str, ...] | None = None, *, verbose: bool = True) -> list[SplitSummary]:
    """Convert the release folder ``src`` (``datasets/<name>``) into ``out_dir/<name>_<split>.jsonl``.

    ``dataset``: one of :data:`RELEASE_DATASETS` (default: from the folder name, ``anli1`` -> ``anli``).
    ``splits``: default every one of :data:`SPLITS` whose file exists. Prints a summary per split.
    """
    folder = Path(os.fspath(src)).expanduser()
    if not folder.is_dir():
        raise MissingFileError(f"release folder not found: {str(src)!r} (expected datasets/<name> of the "
                                f"unzipped datasets.zip)")
    name = folder.resolve().name
    dataset = dataset or _dataset_of(name)
    if dataset not in RELEASE_DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(RELEASE_DATASETS)}; got {dataset!r}")
    if splits is None:
        splits = [s for s in SPLITS if _split_file(folder, name, s) is not None]
        if not splits:
            raise MissingFileError(f"no split files {name}_{{{','.join(SPLITS)}}}.json in {folder}")
    llm = folder / "llm"
    if not llm.is_dir() and verbose:
        print(f"note: {llm} not found; writing rows without palm fields (use label_type: gt)")
    out = Path(os.fspath(out_dir)).expanduser()
    summaries = []
    for split in splits:
        path = _split_file(folder, name, split)
        if path is None:
            raise MissingFileError(f"split file not found: {folder / f'{name}_{split}.json'}")
        rows = [row for _, row in read_rows(path)]
        with_label = 0
        if llm.is_dir():
            for row, text in zip(rows, _completions(llm, split, len(rows), path)):
                rationale, label = parse_output(text, dataset)
                row.update(palm_output=text, palm_rationale=rationale, palm_label=label)
                with_label += bool(label)
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{name}_{split}.jsonl"
        _write_jsonl(target, rows)
        unparsable = len(rows) - with_label if llm.is_dir() else 0
        summaries.append(SplitSummary(split, target, len(rows), with_label, unparsable, llm.is_dir()))
        if verbose:
            palm = f"{with_label} with palm label, {unparsable} unparsable" if llm.is_dir() else "no palm fields"
            print(f"{split}: {len(rows)} rows, {palm} -> {target}")
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdistill.data.stepbystep_release",
                                     description="Convert datasets/<name> of the distilling step-by-step "
                                                 "release into <name>_<split>.jsonl rows with palm fields.")
    parser.add_argument("src", help="the release folder datasets/<name> (cqa, svamp, esnli, anli1)")
    parser.add_argument("out_dir", help="folder for <name>_<split>.jsonl")
    parser.add_argument("--dataset", choices=RELEASE_DATASETS, help="default: from the folder name")
    parser.add_argument("--splits", help="comma-separated, e.g. train,test (default: every split file found)")
    args = parser.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    try:
        convert(args.src, args.out_dir, args.dataset, splits)
    except (DataValidationError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
