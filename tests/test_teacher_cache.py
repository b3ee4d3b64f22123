"""The top-k teacher cache end to end (`kdistill cache`, training from it) and the trainer's chunked losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_config
from kdistill.config import ModelConfig, config_from_dict
from kdistill.data import DataCollatorForDistillation
from kdistill.losses import topk_divergence, topk_from_logits
from kdistill.models import load_model, load_tokenizer
from kdistill.pipeline import prepare, run_training
from kdistill.recipes.lm import build_cache, load_split
from kdistill.teachers.topk_cache import CacheMismatchError
from kdistill.teachers.topk_store import TopKStore
from kdistill.models.heads import align_positions, chunking_problem


def _cache_cfg(pair, data, tmp_path, limit=10, **cache):
    raw = run_config(pair["teacher"], pair["student"], data, tmp_path / "out")
    raw["data"]["limit"] = limit  # rows whose response max_length cuts away are dropped after the limit
    raw["cache"] = {"dir": str(tmp_path / "cache"), "k": 16, "batch_size": 4, **cache}
    raw["objectives"] = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}
    return raw


def _live_topk(pair, cfg, k, temperature=1.0):
    """Per example, the live teacher's top-k over the trained positions, computed independently of the cache."""
    tok = load_tokenizer(ModelConfig(name_or_path=pair["student"]))
    teacher = load_model(ModelConfig(name_or_path=pair["teacher"]))
    ds, _ = load_split(cfg, tok, cfg.data.train, "train", cfg.data.limit, False)
    out = []
    for row in ds.rows:
        batch = DataCollatorForDistillation(pad_token_id=tok.pad_token_id)([row])
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"]).logits
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]
        top = topk_from_logits(logits[labels.ne(-100)][:, :len(tok)], k, temperature)
        out.append((top.indices.numpy(), top.logprobs.numpy()))
    return out


def test_cache_round_trip_equals_live_teacher_topk(tiny_causal, alpaca_small, tmp_path):
    raw = _cache_cfg(tiny_causal, alpaca_small, tmp_path, temperature=2.0)
    raw["objectives"]["kd"]["temperature"] = 2.0  # missing: bucket trains at the capture temperature
    cfg = config_from_dict(raw)
    stats = build_cache(cfg, progress=False)["train"]
    store = TopKStore(tmp_path / "cache" / "train")
    assert store.complete and len(store) == stats["examples"] > 5
    assert store.meta["capture_temperature"] == 2.0 and store.codec.k == 16
    live = _live_topk(tiny_causal, cfg, 16, temperature=2.0)
    assert len(live) == len(store)
    step = store.codec.step
    for i, (ids, logprobs) in enumerate(live):
        got_ids, got_lp = store.get(i)
        assert got_ids.shape == ids.shape and ids.shape[0] > 0
        np.testing.assert_array_equal(got_ids, ids)
        assert np.all(got_lp <= logprobs + 1e-6) and np.all(got_lp >= logprobs - step - 1e-6)
    assert stats["tokens"] == sum(ids.shape[0] for ids, _ in live)
    assert stats["bytes_per_token"] > 0 and stats["kl_mean"] > 0 and stats["kl_sample_tokens"] > 0
    assert stats["record_bytes_per_token"] == (store.codec.id_bits + 12) * 16 / 8


def test_training_from_cache_needs_no_teacher_and_equals_live_kd(tiny_causal, alpaca_small, tmp_path):
    """With k = V the bucket is empty and the cached loss is the live loss, up to log-prob quantisation."""
    vocab = len(load_tokenizer(ModelConfig(name_or_path=tiny_causal["student"])))
    raw = _cache_cfg(tiny_causal, alpaca_small, tmp_path, k=vocab, logprob_bits=16)
    build_cache(config_from_dict(raw), progress=False)
    live = prepare(config_from_dict(raw | {"cache": {}}))
    cached = prepare(config_from_dict(raw))
    assert cached.teacher is None and cached.trainer.teacher.model is None  # the cache, no model in memory
    assert cached.trainer.teacher.capture_temperature == 1.0
    batch = cached.trainer.data_collator([cached.trainer.train_dataset[i] for i in range(4)])
    assert batch["teacher_topk_indices"].shape == (int(batch["labels"][:, 1:].ne(-100).sum()), vocab)
    live_batch = {k: v for k, v in batch.items() if not k.startswith("teacher_topk")}
    for prepared in (live, cached):
        prepared.student.eval()
    with torch.no_grad():
        got = cached.trainer.compute_loss(cached.student, dict(batch))
        expected = live.trainer.compute_loss(live.student, dict(live_batch))
    assert got.item() == pytest.approx(expected.item(), rel=2e-3)


def test_cached_kd_loss_is_topk_divergence_of_the_stored_rows(tiny_causal, alpaca_small, tmp_path):
    raw = _cache_cfg(tiny_causal, alpaca_small, tmp_path)
    raw["objectives"] = {"kd": {"divergence": "jsd", "missing": "bucket"}}
    build_cache(config_from_dict(raw), progress=False)
    prepared = prepare(config_from_dict(raw))
    trainer = prepared.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    prepared.student.eval()
    with torch.no_grad():
        got = trainer.compute_loss(prepared.student, dict(batch))
        logits, labels = align_positions(prepared.student(input_ids=batch["input_ids"],
                                                           attention_mask=batch["attention_mask"]).logits,
                                         batch["labels"], False)
    mask = labels.ne(-100)
    teacher = topk_from_logits(torch.zeros(1, 2), 1)  # replaced below: the stored rows
    teacher.indices, teacher.logprobs = batch["teacher_topk_indices"], batch["teacher_topk_logprobs"]
    expected = topk_divergence(logits[mask][:, :trainer.kd_vocab], teacher, "jsd", beta=0.5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_train_from_cache_end_to_end(tiny_causal, alpaca_small, tmp_path):
    raw = _cache_cfg(tiny_causal, alpaca_small, tmp_path)
    raw["objectives"]["kd"]["missing"] = "renormalize"
    raw["objectives"]["kd"]["temperature"] = 2.0  # renormalize re-tempers the k ids exactly
    build_cache(config_from_dict(raw), progress=False)
    summary = run_training(config_from_dict(raw))
    assert summary["global_step"] == 2
    assert any("kd/top1_agreement" in entry for entry in summary["log_history"])


def test_mismatched_cache_is_refused_with_the_reason(tiny_causal, alpaca_small, tmp_path):
    raw = _cache_cfg(tiny_causal, alpaca_small, tmp_path, limit=6)
    n = build_cache(config_from_dict(raw), progress=False)["train"]["examples"]

    with pytest.raises(CacheMismatchError, match=f"holds {n} examples, the data has {n + 2}"):
        prepare(config_from_dict(raw | {"data": raw["data"] | {"limit": 8}}))

    cfg = config_from_dict(raw)
    tok = load_tokenizer(cfg.student)
    line = int(load_split(cfg, tok, cfg.data.train, "train", 6, False)[0].sources[2].rsplit(":", 1)[1])
    edited = tmp_path / "edited.jsonl"
    rows = [json.loads(text) for text in alpaca_small.read_text().splitlines()]
    rows[line - 1]["output"] = "Something else entirely."
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CacheMismatchError, match=rf"edited\.jsonl:{line}: the example's tokens differ"):
        prepare(config_from_dict(raw | {"data": raw["data"] | {"train": str(edited)}}))

    with pytest.raises(CacheMismatchError, match="holds teacher"):
        prepare(config_from_dict(raw | {"teacher": {"name_or_path": tiny_causal["student"]}}))

    with pytest.raises(CacheMismatchError, match="captured at temperature 1.0"):
        prepare(config_from_dict(raw | {"cache": raw["cache"] | {"temperature": 2.0},
                                        "objectives": {"kd": {"temperature": 2.0}}}))

    with pytest.raises(CacheMismatchError, match="no top-k cache here"):
        prepare(config_from_dict(raw | {"cache": {"dir": str(tmp_path / "nowhere")}}))


def test_bucket_with_another_temperature_refused_before_loading(tiny_causal, alpaca_small, tmp_path):
    from kdistill.config import ConfigError

    raw = _cache_cfg(tiny_causal, alpaca_small, tmp_path)
    raw["objectives"]["kd"]["temperature"] = 2.0
    with pytest.raises(ConfigError, match="missing: bucket needs the loss temperature"):
        config_from_dict(raw)
    raw["objectives"] = {"kd": {}, "hidden": {}}
    with pytest.raises(ConfigError, match=r"objectives.hidden \(hidden\) needs a live teacher model"):
        config_from_dict(raw)


def test_killed_cache_run_resumes_without_duplicates(tiny_causal, alpaca_small, tmp_path, monkeypatch):
    from kdistill.teachers import topk_writer

    raw = _cache_cfg(tiny_causal, alpaca_small, tmp_path, limit=11, batch_size=2)
    clean = _cache_cfg(tiny_causal, alpaca_small, tmp_path / "clean", limit=11, batch_size=2)
    build_cache(config_from_dict(clean), progress=False)

    real_append = topk_writer.TopKStoreWriter.append
    calls = {"n": 0}

    def dying_append(self, *args, **kwargs):
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real_append(self, *args, **kwargs)

    monkeypatch.setattr(topk_writer.TopKStoreWriter, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        build_cache(config_from_dict(raw), progress=False)
    monkeypatch.setattr(topk_writer.TopKStoreWriter, "append", real_append)
    partial = TopKStore(tmp_path / "cache" / "train")
    assert not partial.complete and len(partial) == 5
    with pytest.raises(CacheMismatchError, match="incomplete"):
        prepare(config_from_dict(raw))

    build_cache(config_from_dict(raw), progress=False)
    resumed, reference = TopKStore(tmp_path / "cache" / "train"), TopKStore(tmp_path / "clean" / "cache" / "train")
    assert resumed.complete and len(resumed) == len(reference) > 5
    for i in range(len(reference)):
        assert resumed.example_hash(i) == reference.example_hash(i)
        for a, b in zip(resumed.get(i), reference.get(i)):
            np.testing.assert_array_equal(a, b)
    assert resumed.total_tokens() == reference.total_tokens()


def test_cache_cli(tiny_causal, alpaca_small, tmp_path, capsys):
    import yaml

    from kdistill.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_cache_cfg(tiny_causal, alpaca_small, tmp_path, limit=4)))
    assert main(["cache", str(config), "--set", "cache.k=8"]) == 0
    stats = json.loads(capsys.readouterr().out)
    n = stats["train"]["examples"]
    assert stats["train"]["k"] == 8 and 0 < n <= 4
    assert main(["train", str(config), "--set", "cache.k=8", "--set", "data.limit=12"]) == 2
    assert f"holds {n} examples" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ chunked trainer
def _grads(prepared, batch):
    model = prepared.student
    model.zero_grad()
    loss = prepared.trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_trainer_chunked_equals_dense(kind, tiny_causal, tiny_t5, alpaca_small, tmp_path):
    pair = tiny_causal if kind == "causal" else tiny_t5
    raw = run_config(pair["teacher"], pair["student"], alpaca_small, tmp_path)
    raw["objectives"] = {"ce": {"weight": 0.3}, "kd": {"weight": 0.7, "divergence": "jsd", "temperature": 2.0}}
    dense = prepare(config_from_dict(raw | {"chunked_loss": {"mode": "off"}}))
    chunked = prepare(config_from_dict(raw | {"chunked_loss": {"mode": "on", "chunk_size": 7}}))
    assert dense.trainer.chunk_size is None and chunked.trainer.chunk_size == 7
    chunked.student.load_state_dict(dense.student.state_dict())
    batch = DataCollatorForDistillation(pad_token_id=dense.tokenizer.pad_token_id)(
        [dense.trainer.train_dataset[i] for i in range(4)])
    for prepared in (dense, chunked):
        prepared.student.eval()  # no dropout: the two passes must see the same function
    loss_d, grads_d = _grads(dense, batch)
    loss_c, grads_c = _grads(chunked, batch)
    assert loss_c.item() == pytest.approx(loss_d.item(), rel=1e-5)
    assert grads_c.keys() == grads_d.keys()
    for name in grads_d:
        torch.testing.assert_close(grads_c[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_chunking_threshold_and_softcap_fallback(tiny_causal, alpaca_small, tmp_path):
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path)
    small = prepare(config_from_dict(raw))  # auto, vocabulary 400 < min_vocab
    assert small.trainer.chunk_size is None
    auto = prepare(config_from_dict(raw | {"chunked_loss": {"min_vocab": 100}}))
    assert auto.trainer.chunk_size == "auto"  # the default: rows chosen per loss by auto_chunk_size

    student = auto.student
    assert chunking_problem(student, False) is None
    handle = student.register_forward_hook(
        lambda module, args, out: out.__setitem__("logits", torch.tanh(out["logits"])) or out)  # soft-capping at 1
    try:
        assert "not hidden @ lm_head.weight.T" in chunking_problem(student, False)
        assert auto.trainer.resolve_chunking({"mode": "auto", "chunk_size": 8, "min_vocab": 1}) is None
        with pytest.raises(ValueError, match="cannot be used: the student: its logits are not"):
            auto.trainer.resolve_chunking({"mode": "on", "chunk_size": 8, "min_vocab": 1})
    finally:
        handle.remove()


def test_chunked_with_lora_student(tiny_causal, alpaca_small, tmp_path):
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path)
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    dense = prepare(config_from_dict(raw | {"chunked_loss": {"mode": "off"}}))
    chunked = prepare(config_from_dict(raw | {"chunked_loss": {"mode": "on", "chunk_size": 16}}))
    chunked.student.load_state_dict(dense.student.state_dict())
    batch = DataCollatorForDistillation(pad_token_id=dense.tokenizer.pad_token_id)(
        [dense.trainer.train_dataset[i] for i in range(3)])
    loss_d, grads_d = _grads(dense, batch)
    loss_c, grads_c = _grads(chunked, batch)
    assert loss_c.item() == pytest.approx(loss_d.item(), rel=1e-5)
    assert grads_d and all("lora" in n for n in grads_d)
    for name in grads_d:
        torch.testing.assert_close(grads_c[name], grads_d[name], rtol=1e-4, atol=1e-6)


def test_eval_split_is_cached_and_evaluated_from_the_cache(tiny_causal, alpaca_small, tmp_path):
    raw = _cache_cfg(tiny_causal, alpaca_small, tmp_path, limit=6)
    raw["data"] |= {"eval": str(alpaca_small), "eval_limit": 4}
    stats = build_cache(config_from_dict(raw), progress=False)
    assert set(stats) == {"train", "eval"} and (tmp_path / "cache" / "eval" / "manifest.json").is_file()
    prepared = prepare(config_from_dict(raw))
    assert prepared.teacher is None
    prepared.trainer.evaluate()
    metrics = prepared.trainer.state.log_history[-1]  # per-term values are logged with the eval metrics
    assert metrics["eval_loss/kd"] > 0 and 0 <= metrics["eval_kd/top1_agreement"] <= 1


def test_cache_folder_of_other_settings_is_not_mixed(tiny_causal, alpaca_small, tmp_path):
    raw = _cache_cfg(tiny_causal, alpaca_small, tmp_path, limit=3)
    build_cache(config_from_dict(raw), progress=False)
    with pytest.raises(CacheMismatchError, match="k"):
        build_cache(config_from_dict(raw | {"cache": raw["cache"] | {"k": 8}}), progress=False)
    assert TopKStore(tmp_path / "cache" / "train").codec.k == 16  # the first cache is intact
