"""Derive the data kdistill ships from the development data set (a maintainer's script, not part of the product).

    python scripts/build_bundled_data.py [--shared ../shared/data]

Writes, deterministically (file order, no sampling by chance):

* src/kdistill/resources/stsb_dev_ccbysa.jsonl: the STS Benchmark dev pairs whose sentences are redistributable
  under CC BY-SA (sources `images` and `track5.en-en`); the other sources are left out (see the resources README).
* src/kdistill/resources/hate_speech_stormfront_400.jsonl: the first 200 `hate` and the first 200 `noHate` rows of
  de Gibert et al.'s balanced training split (CC BY-SA 3.0).
* examples/data/*.jsonl: the rows the offline example configs under examples/tiny/ need (see examples/data/README.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESOURCES = REPO / "src" / "kdistill" / "resources"
EXAMPLE_DATA = REPO / "examples" / "data"
STS_SOURCES = ("images", "track5.en-en")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{path.relative_to(REPO)}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KiB")


def sts_pairs(shared: Path) -> list[dict]:
    keep = ("genre", "filename", "year", "sid", "score", "sentence1", "sentence2")
    return [{k: r[k] for k in keep} for r in read_jsonl(shared / "stsb" / "sts-dev.jsonl")
            if r["filename"] in STS_SOURCES]


def hate_speech(shared: Path, per_label: int = 200) -> list[dict]:
    rows, counts = [], {"hate": 0, "noHate": 0}
    for r in read_jsonl(shared / "hate_speech_stormfront" / "sampled_train.jsonl"):
        if counts.get(r["label"], per_label) < per_label:
            counts[r["label"]] += 1
            rows.append({"file_id": r["file_id"], "text": r["text"], "label": r["label"]})
    return rows


def minicsm_rows(triplets: list[dict]) -> list[dict]:
    """NLI triplets in the MiniCSM row shape: a premise (the consensus statement) generates a statement it
    supports; the supporting and refuting sentences feed the triplet objective."""
    return [{"prompt": t["sent0"], "completion": t["sent1"], "consensus": t["sent0"], "supporting": t["sent1"],
             "refuting": t["hard_neg"]} for t in triplets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    shared = parser.parse_args().shared
    write_jsonl(RESOURCES / "stsb_dev_ccbysa.jsonl", sts_pairs(shared))
    write_jsonl(RESOURCES / "hate_speech_stormfront_400.jsonl", hate_speech(shared))
    write_jsonl(EXAMPLE_DATA / "alpaca_2000.jsonl", read_jsonl(shared / "alpaca" / "alpaca_small_2000.jsonl"))
    write_jsonl(EXAMPLE_DATA / "alpaca_gpt4_eval_64.jsonl",
                read_jsonl(shared / "alpaca_gpt4_demo" / "alpaca_en_demo.jsonl")[:64])
    triplets = read_jsonl(shared / "nli_triplets" / "nli_triplets_snli_dev.jsonl")
    write_jsonl(EXAMPLE_DATA / "nli_triplets_1200.jsonl", triplets[:1200])
    write_jsonl(EXAMPLE_DATA / "nli_minicsm_300.jsonl", minicsm_rows(triplets[1200:1500]))
    cqa_keep = ("id", "question", "choices", "answer", "palm_rationale", "palm_label")
    for split, n in (("train", 512), ("test", 100)):
        rows = read_jsonl(shared / "dsbs_cqa" / f"cqa_{split}.jsonl")[:n]
        write_jsonl(EXAMPLE_DATA / f"cqa_{split}_{n}.jsonl", [{k: r[k] for k in cqa_keep} for r in rows])


if __name__ == "__main__":
    main()
