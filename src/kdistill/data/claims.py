"""Claim-evidence data -> contrastive triplets and claim -> stance targets (the MiniCSM-style T5 recipe).

Input: claim-evidence pairs, one JSON object per line with `claim_id`, `claim`, `claim_label` and an evidence
with its `evidence_label` (SUPPORTS / REFUTES / NOT_ENOUGH_INFO), as in the flattened Climate-FEVER file
(Diggelmann et al., 2020, "CLIMATE-FEVER: A Dataset for Verification of Real-World Climate Claims"). The original
nested format (`evidences`: a list per claim) is read too.

Output rows, one per triplet, ready for `kdistill train`:

    {"prompt": <claim>, "completion": <claim stance>,                       # the generation ("stance") target
     "consensus": <claim>, "supporting": <a SUPPORTS evidence>, "refuting": <a REFUTES evidence>}

Rule (deterministic, no sampling): a claim forms triplets only if it has at least one SUPPORTS and one REFUTES
evidence; its i-th supporting evidence is paired with its (i mod R)-th refuting evidence, R refuting evidences in
file order, so every supporting evidence is used once. Claims that cannot form a triplet are counted by reason
(`no_supporting`, `no_refuting`, `neither`). Every claim also gives one stance row `{prompt, completion}`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from kdistill.data.io import DataValidationError, iter_json_lines


@dataclass
class ClaimRecipe:
    triplets: list[dict]
    stance: list[dict]
    counts: dict[str, int] = field(default_factory=dict)


def _claims(path: Path) -> "OrderedDict[str, dict]":
    claims: OrderedDict[str, dict] = OrderedDict()
    errors: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for where, row, error in iter_json_lines(fh, str(path)):
            if error is not None:
                errors.append(f"{where}: invalid JSON: {error.msg}")
                continue
            missing = [k for k in ("claim_id", "claim", "claim_label") if not isinstance(row.get(k), str)]
            if missing:
                errors.append(f"{where}: missing or non-string field(s): {', '.join(missing)}")
                continue
            entry = claims.setdefault(row["claim_id"], {"claim": row["claim"], "label": row["claim_label"],
                                                        "SUPPORTS": [], "REFUTES": []})
            evidences = row["evidences"] if isinstance(row.get("evidences"), list) else [row]
            for ev in evidences:
                if not isinstance(ev, dict) or not isinstance(ev.get("evidence"), str) or \
                        not isinstance(ev.get("evidence_label"), str):
                    errors.append(f"{where}: an evidence needs string 'evidence' and 'evidence_label'")
                    continue
                if ev["evidence_label"] in ("SUPPORTS", "REFUTES") and ev["evidence"].strip():
                    entry[ev["evidence_label"]].append(ev["evidence"].strip())
    if errors:
        raise DataValidationError(errors)
    if not claims:
        raise DataValidationError([f"{path}:1: file contains no rows"])
    return claims


def claim_triplets(path: str | Path, stance_labels: tuple[str, ...] | None = None) -> ClaimRecipe:
    """Build triplet rows and stance rows from a claim-evidence file (see the module docstring).

    `stance_labels`: keep stance targets only for claims with one of these labels (e.g. ("SUPPORTS", "REFUTES"));
    None keeps all. Triplets are built from evidence labels and do not depend on it.
    """
    claims = _claims(Path(path))
    counts = {"claims": len(claims), "claims_with_triplets": 0, "triplets": 0, "no_supporting": 0,
              "no_refuting": 0, "neither": 0, "stance_rows": 0}
    triplets, stance = [], []
    for entry in claims.values():
        label = entry["label"]
        keep_stance = stance_labels is None or label in stance_labels
        if keep_stance:
            stance.append({"prompt": entry["claim"], "completion": label})
        supporting, refuting = entry["SUPPORTS"], entry["REFUTES"]
        if not supporting or not refuting:
            key = "neither" if not supporting and not refuting else ("no_supporting" if not supporting else
                                                                      "no_refuting")
            counts[key] += 1
            continue
        counts["claims_with_triplets"] += 1
        for i, evidence in enumerate(supporting):
            triplets.append({"prompt": entry["claim"], "completion": label, "consensus": entry["claim"],
                             "supporting": evidence, "refuting": refuting[i % len(refuting)]})
    counts["triplets"] = len(triplets)
    counts["stance_rows"] = len(stance)
    return ClaimRecipe(triplets=triplets, stance=stance, counts=counts)


def write_recipe(path: str | Path, out_dir: str | Path, stance_labels: tuple[str, ...] | None = None) -> dict:
    """Write `triplets.jsonl`, `stance.jsonl` and `counts.json` under `out_dir`; returns the counts."""
    recipe = claim_triplets(path, stance_labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("triplets", recipe.triplets), ("stance", recipe.stance)):
        tmp = out / f"{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out / f"{name}.jsonl")
    (out / "counts.json").write_text(json.dumps(recipe.counts, indent=2))
    return recipe.counts


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Claim-evidence pairs -> triplets and stance targets")
    parser.add_argument("pairs", help="claim-evidence JSONL, e.g. dataset/climate-fever.jsonl of "
                        "https://github.com/tdiggelm/climate-fever-dataset")
    parser.add_argument("out_dir")
    parser.add_argument("--stance-labels", default=None, help="comma-separated, e.g. SUPPORTS,REFUTES (default: all)")
    args = parser.parse_args()
    labels = tuple(args.stance_labels.split(",")) if args.stance_labels else None
    print(json.dumps(write_recipe(args.pairs, args.out_dir, labels), indent=2))
