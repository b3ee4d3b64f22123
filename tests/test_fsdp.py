"""FSDP2 sharding (`distributed: {strategy: fsdp}`): configuration, and on CPU with gloo and two processes: the same
losses as one process on the same global batch (dense and chunked kd, causal and T5), sharded checkpoints that a
killed run resumes from, and an exported student that is one ordinary save_pretrained folder equal to the trained
weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import (REPO, assert_export_loads, launch_two as _launch, one_and_two_processes, run_checked as _run,
                      run_config, summary_logs as _logs)
from kdistill.config import ConfigError, config_from_dict
from kdistill.pipeline import fsdp_arguments

KEYS = ("loss", "grad_norm", "loss/ce", "loss/kd", "kd/top1_agreement")
# Two processes sum the same per-token terms in another order, and the chunked losses project a chunk of positions
# at a time: float32 rounding, nothing more (a missing or doubled gradient share moves grad_norm by far more).
REL = 1e-5


def _cfg(tiny, data, tmp_path, **extra):
    raw = run_config(tiny["teacher"], tiny["student"], data, tmp_path / "out")
    raw.update(extra)
    return raw


# ------------------------------------------------------------------------------------------ configuration (fast)
def test_fsdp_section_maps_onto_the_trainer_arguments(tiny_causal, alpaca_small, tmp_path, monkeypatch):
    cfg = config_from_dict(_cfg(tiny_causal, alpaca_small, tmp_path, distributed={
        "strategy": "fsdp", "layer_classes": ["Qwen2DecoderLayer"], "checkpoint": "full"}))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert fsdp_arguments(cfg) == {}  # one process: nothing to shard, trained as usual
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = fsdp_arguments(cfg)
    assert args["fsdp"] is True
    assert args["fsdp_config"] == {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                   "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT",
                                   "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]}
    assert fsdp_arguments(config_from_dict(_cfg(tiny_causal, alpaca_small, tmp_path))) == {}  # default: ddp


@pytest.mark.parametrize("change, message", [
    ({"distributed": {"strategy": "zero3"}}, "distributed.strategy"),
    ({"task": "embedding", "objectives": {"contrastive": {}}}, "task lm"),
    ({"lora": {"enabled": True}}, "lora.enabled is not supported"),
    ({"training": {"fsdp": "full_shard"}}, "remove training.fsdp"),
])
def test_fsdp_refusals_name_the_setting(change, message, tiny_causal, alpaca_small, tmp_path):
    raw = _cfg(tiny_causal, alpaca_small, tmp_path, distributed={"strategy": "fsdp"})
    for key, value in change.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


# ------------------------------------------------------------------------------------ two processes (slow, gloo)


def _assert_sharded_checkpoint(checkpoint):
    """Each process wrote its own shard of the weights and of the optimizer state (torch.distributed.checkpoint)."""
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
# dense and chunked kd on the causal pair, chunked on T5 (the dense T5 path shares the sharding and the dense loss
# with these; dropped to keep the suite's time down)
@pytest.mark.parametrize("pair, chunked", [("causal", False), ("causal", True), ("t5", True)],
                         ids=["dense-causal", "chunked-causal", "chunked-t5"])
def test_two_sharded_processes_match_one_process(pair, chunked, request, alpaca_small, tmp_path):
    """Two FSDP2 processes x 2 rows (student and teacher sharded) give the first two optimizer steps' losses and
    gradient norm of one unsharded process x 4 rows, dense logits or chunked; the exported student equals the one
    process's student and loads with the stock classes."""
    tiny = request.getfixturevalue(f"tiny_{pair}")
    raw = _cfg(tiny, alpaca_small, tmp_path, distributed={"strategy": "fsdp"},
               chunked_loss={"mode": "off"})
    raw["training"].update(max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=2)
    one, two, _ = one_and_two_processes(raw, tmp_path, 29620 + 2 * int(chunked) + int(pair == "t5"),
                                        f"chunked_loss.mode={'on' if chunked else 'off'}", "chunked_loss.chunk_size=16")
    _assert_sharded_checkpoint(two / "checkpoint-2")
    for step in (0, 1):
        for key in KEYS:
            a, b = _logs(one)[step][key], _logs(two)[step][key]
            assert b == pytest.approx(a, rel=REL), (step, key, a, b)
    reference, exported = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert exported.keys() == reference.keys()
    for name in reference:  # two steps of Adam at lr 1e-3 on the same gradients
        torch.testing.assert_close(exported[name], reference[name], atol=1e-6, rtol=1e-5)
    assert_export_loads(two, exported, pair == "t5")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["student", "teacher"])
def test_two_sharded_processes_generate_in_step_on_policy(sampler, tiny_causal, alpaca_small, tmp_path):
    """On-policy under FSDP2: answers of different lengths end at different decoding steps on the two processes;
    the sharded student (or, seq_kd, the sharded teacher) still generates in step with the other process (synced),
    nothing hangs, and the first step equals one process's."""
    policy = {"max_new_tokens": 40} if sampler == "student" else {"max_new_tokens": 40, "lmbda": 0.0, "seq_kd": True}
    raw = _cfg(tiny_causal, alpaca_small, tmp_path, distributed={"strategy": "fsdp"},
               on_policy=policy, objectives={"kd": {"divergence": "reverse_kl"}},
               chunked_loss={"mode": "on", "chunk_size": 16})
    raw["training"].update(max_steps=1)
    one, two, _ = one_and_two_processes(raw, tmp_path, 29625 + (sampler == "teacher"))
    a, b = _logs(one)[0], _logs(two)[0]
    assert 0 < a[f"on_policy/{sampler}_truncated"] < 1
    for key in ("loss", "grad_norm", "loss/kd", f"on_policy/{sampler}_answer_length"):
        assert b[key] == pytest.approx(a[key], rel=REL), (key, a[key], b[key])


@pytest.mark.slow
def test_sharded_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tiny_causal, alpaca_small,
                                                                                      tmp_path):
    """SIGKILL a two-process FSDP2 run (all its processes) after its first sharded checkpoint; the same command
    resumes from it and ends with the student of a run that was never interrupted."""
    raw = _cfg(tiny_causal, alpaca_small, tmp_path, distributed={"strategy": "fsdp"},
               chunked_loss={"mode": "on", "chunk_size": 16})
    # many small steps, a checkpoint every 3: the run is still training when the kill lands after checkpoint-3
    raw["training"].update(max_steps=30, per_device_train_batch_size=2, save_strategy="steps", save_steps=3, seed=0)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))

    def command(out):
        return _launch([str(config), "--set", f"training.output_dir={out}"], 29627)

    straight = tmp_path / "straight"
    _run(command(straight))
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command(killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (killed / "checkpoint-3" / "kdistill_fingerprint.json").exists():
        time.sleep(0.01)
    # the launcher, torchrun's agent and both training processes (torchrun starts its workers in their own sessions)
    root = psutil.Process(proc.pid)
    tree = [*root.children(recursive=True), root]
    for process in tree:
        process.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=60)
    assert not (killed / "kdistill_summary.json").exists(), "the run finished before it could be killed"
    _assert_sharded_checkpoint(killed / "checkpoint-3")
    assert not (killed / "checkpoint-30").exists(), "the run was killed after its last step"
    _run(command(killed))
    summary = json.loads((killed / "kdistill_summary.json").read_text())
    assert summary["global_step"] == 30 and "checkpoint-" in summary["resumed_from"]
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
