"""Two processes (CPU, gloo) give the same first optimizer step as one process on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, run_config

KEYS = ("loss", "grad_norm", "loss/ce", "loss/kd", "kd/top1_agreement")


def _first_log(cmd, out_dir, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out_dir / "kdistill_summary.json").read_text())
    return summary["log_history"][0]


ON_POLICY_KEYS = ("loss", "grad_norm", "loss/kd", "kd/teacher_nll", "kd/student_samples_divergence",
                  "on_policy/student_answer_length")


@pytest.mark.slow
@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
def test_two_processes_match_one_process_on_the_same_global_batch(on_policy, tiny_causal, alpaca_small, tmp_path):
    """On-policy: the two processes sample the same answers one process does (each answer has its own seed) and
    generate in step (synced), so the first step's loss and gradient agree too."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate's launcher is installed with kdistill"
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path / "one",
                     max_steps=1, per_device_train_batch_size=4)
    if on_policy:
        raw["on_policy"] = {"max_new_tokens": 40}  # long enough that some answers end early, others do not
        raw["objectives"] = {"kd": {"divergence": "reverse_kl"}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    one = _first_log([sys.executable, "-m", "kdistill.cli", "train", str(config)], tmp_path / "one")
    # `accelerate launch --multi_gpu` starts the processes with torchrun; with no GPU kdistill runs them on
    # the CPU with the gloo backend. Two processes x 2 rows = the same global batch of 4 rows.
    two = _first_log([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no",
                      "--main_process_port", "29518" if on_policy else "29517",
                      "-m", "kdistill.cli", "train", str(config),
                      "--set", f"training.output_dir={tmp_path / 'two'}",
                      "--set", "training.per_device_train_batch_size=2"], tmp_path / "two")
    if on_policy:  # answers of different lengths: processes finish generating at different steps
        assert 0 < one["on_policy/student_truncated"] < 1
    for key in ON_POLICY_KEYS if on_policy else KEYS:
        assert two[key] == pytest.approx(one[key], rel=1e-5), (key, one[key], two[key])
