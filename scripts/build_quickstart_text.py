"""Derive src/kdistill/resources/esnli_sentences.txt.gz from ../shared/data/dsbs_esnli/esnli_valid.jsonl.

Distinct sentences (whitespace collapsed, 8-300 characters, first-seen order) from the fields premise,
hypothesis (SNLI dev, CC BY-SA 4.0) and explanation_1..3 (e-SNLI human explanations, MIT).
Run from the repository root: python scripts/build_quickstart_text.py
"""

import gzip
import json
from pathlib import Path

SOURCE = Path("../shared/data/dsbs_esnli/esnli_valid.jsonl")
TARGET = Path("src/kdistill/resources/esnli_sentences.txt.gz")
FIELDS = ("premise", "hypothesis", "explanation_1", "explanation_2", "explanation_3")


def main() -> None:
    seen: set[str] = set()
    out: list[str] = []
    with SOURCE.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            for field in FIELDS:
                text = " ".join((row.get(field) or "").split())
                if 8 <= len(text) <= 300 and text not in seen:
                    seen.add(text)
                    out.append(text)
    with gzip.open(TARGET, "wt", encoding="utf-8", compresslevel=9) as fh:
        fh.write("\n".join(out) + "\n")
    print(f"{TARGET}: {len(out)} sentences")


if __name__ == "__main__":
    main()
