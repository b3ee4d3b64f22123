"""The claim-evidence recipe: triplets from Climate-FEVER, stance targets, counts, errors."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA
from kdistill.data import DataValidationError, load_examples
from kdistill.data.claims import claim_triplets, write_recipe

PAIRS = SHARED_DATA / "climate_fever" / "climate-fever_pairs.jsonl"
NESTED = SHARED_DATA / "climate_fever" / "climate-fever.jsonl"


def test_climate_fever_triplets_are_built_from_each_claims_own_evidence(shared_data):
    recipe = claim_triplets(PAIRS)
    c = recipe.counts
    assert c["claims"] == 304 and c["stance_rows"] == 304
    assert c["claims_with_triplets"] + c["no_supporting"] + c["no_refuting"] + c["neither"] == c["claims"]
    assert c["triplets"] == len(recipe.triplets) > 0
    evidence = {}
    for line in PAIRS.read_text().splitlines():
        row = json.loads(line)
        evidence.setdefault(row["claim"], {"SUPPORTS": set(), "REFUTES": set(), "label": row["claim_label"]})
        if row["evidence_label"] in ("SUPPORTS", "REFUTES"):
            evidence[row["claim"]][row["evidence_label"]].add(row["evidence"].strip())
    for t in recipe.triplets:
        own = evidence[t["consensus"]]
        assert t["supporting"] in own["SUPPORTS"] and t["refuting"] in own["REFUTES"]
        assert t["prompt"] == t["consensus"] and t["completion"] == own["label"]
    # every supporting evidence of a triplet-forming claim is used exactly once
    used = sum(len(v["SUPPORTS"]) for v in evidence.values() if v["SUPPORTS"] and v["REFUTES"])
    assert used == c["triplets"]


def test_nested_original_format_gives_the_same_recipe(shared_data):
    a, b = claim_triplets(PAIRS), claim_triplets(NESTED)
    assert a.counts == b.counts and a.triplets == b.triplets and a.stance == b.stance


def test_stance_label_filter_and_written_files_load_as_training_data(shared_data, tmp_path):
    counts = write_recipe(PAIRS, tmp_path, stance_labels=("SUPPORTS", "REFUTES"))
    stance = [json.loads(line) for line in (tmp_path / "stance.jsonl").read_text().splitlines()]
    assert counts["stance_rows"] == len(stance) and {s["completion"] for s in stance} == {"SUPPORTS", "REFUTES"}
    assert json.loads((tmp_path / "counts.json").read_text()) == counts
    triplet_rows = load_examples(str(tmp_path / "triplets.jsonl")).examples
    assert len(triplet_rows) == counts["triplets"] and triplet_rows[0].kind == "prompt_completion"


def test_bad_rows_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"claim_id": "1", "claim": "c", "claim_label": "SUPPORTS", "evidence": "e", '
                   '"evidence_label": "SUPPORTS"}\n{"claim_id": "2", "claim_label": "REFUTES"}\nnot json\n')
    with pytest.raises(DataValidationError) as err:
        claim_triplets(bad)
    text = str(err.value)
    assert "bad.jsonl:2: missing or non-string field(s): claim" in text and "bad.jsonl:3: invalid JSON" in text
