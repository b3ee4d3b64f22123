"""The crosstok objective (issue #17) through the trainer: the same-tokenizer reductions, refusals, and an
end-to-end run with two different tokenizers."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_config
from kdistill.config import ConfigError, config_from_dict
from kdistill.data.cross_rows import CHUNK_KEYS, TEACHER_VIEW
from kdistill.losses.cross_tokenizer import alm_loss
from kdistill.models import VocabularyMismatchError
from kdistill.pipeline import prepare, run_training


@pytest.fixture(scope="module")
def other_vocab_teacher(tmp_path_factory, alpaca_small):
    """A teacher whose tokenizer (BPE, 300 entries, another seed) is not the tiny students'."""
    from kdistill.apps.tiny import make_tiny_pair

    return make_tiny_pair(tmp_path_factory.mktemp("other-vocab"), kind="causal", data=alpaca_small, vocab_size=300,
                          teacher_steps=60, seed=1, progress=False)["teacher"]


def _prepared(teacher, student, data, tmp_path, objectives, **training):
    raw = run_config(teacher, student, data, tmp_path / "out", **training)
    raw["objectives"] = objectives
    return prepare(config_from_dict(raw))


def _loss(prepared, rows=4):
    trainer = prepared.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    prepared.student.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(prepared.student, batch)), batch


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_gold_with_one_tokenizer_equals_the_same_tokenizer_divergence(divergence, tiny_causal, alpaca_small,
                                                                       tmp_path):
    kd = _prepared(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path,
                   {"kd": {"divergence": divergence}})
    gold = _prepared(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path,
                     {"x": {"type": "crosstok", "method": "gold", "divergence": divergence}})
    (kd_loss, kd_batch), (gold_loss, gold_batch) = _loss(kd), _loss(gold)
    assert torch.equal(kd_batch["input_ids"], gold_batch["input_ids"])
    assert torch.equal(gold_batch[f"{TEACHER_VIEW}_input_ids"], gold_batch["input_ids"])
    # every trained token is a one-token chunk on both sides, so gold compares every position kd does
    assert gold_loss == pytest.approx(kd_loss, rel=1e-5)


def test_alm_with_one_tokenizer_is_per_token_likelihood_matching(tiny_causal, alpaca_small, tmp_path):
    prepared = _prepared(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path,
                         {"x": {"type": "crosstok", "method": "alm", "binarization_temperature": 1.0}})
    loss, batch = _loss(prepared)
    from kdistill.models import load_model
    from kdistill.config import ModelConfig

    teacher = load_model(ModelConfig(name_or_path=tiny_causal["teacher"]))
    with torch.no_grad():
        s = prepared.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    chunks = batch[CHUNK_KEYS[0]][:, 1:]
    assert torch.equal(chunks >= 0, targets >= 0)  # one chunk per trained token
    mask = targets >= 0
    vocab = prepared.trainer.objectives["x"][0].vocab[0]
    ls = s[..., :vocab].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask]
    lt = t[..., :vocab].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask]
    by_hand = alm_loss(ls, lt, binarization_temperature=1.0, reduction="sum") / mask.sum()
    assert loss == pytest.approx(float(by_hand), rel=1e-5)


def test_different_tokenizers_are_aligned_per_row(other_vocab_teacher, tiny_causal, alpaca_small, tmp_path):
    prepared = _prepared(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path,
                         {"x": {"type": "crosstok", "method": "alm"}})
    row = prepared.trainer.train_dataset[0]
    assert row["input_ids"] != row[f"{TEACHER_VIEW}_input_ids"]
    s_chunks, t_chunks = row[CHUNK_KEYS[0]], row[CHUNK_KEYS[1]]
    assert set(c for c in s_chunks if c >= 0) == set(c for c in t_chunks if c >= 0) != set()
    from kdistill.models import load_tokenizer
    from kdistill.config import ModelConfig

    s_tok = load_tokenizer(ModelConfig(name_or_path=tiny_causal["student"]))
    t_tok = load_tokenizer(ModelConfig(name_or_path=other_vocab_teacher))
    for c in sorted(set(c for c in s_chunks if c >= 0))[:20]:  # each chunk spells the same text on both sides
        s_text = s_tok.decode([i for i, k in zip(row["input_ids"], s_chunks) if k == c])
        t_text = t_tok.decode([i for i, k in zip(row[f"{TEACHER_VIEW}_input_ids"], t_chunks) if k == c])
        assert s_text.strip() == t_text.strip(), (c, s_text, t_text)


def test_refusals(other_vocab_teacher, tiny_causal, alpaca_small, tmp_path):
    with pytest.raises(VocabularyMismatchError, match="crosstok"):
        _prepared(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path, {"kd": {}})
    server = {"teacher": {"server": {"url": "http://h/v1", "model": "m"}}}
    cache = {"cache": {"dir": str(tmp_path / "c")}}
    for method, extra in (("gold", cache), ("uld", cache), ("gold", server), ("uld", server)):
        raw = run_config(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path / "o")
        raw["objectives"] = {"x": {"type": "crosstok", "method": method}}
        raw.update(extra)
        with pytest.raises(ConfigError, match="needs a loaded teacher"):
            config_from_dict(raw)
    raw = run_config(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path / "o")
    raw["objectives"] = {"x": {"type": "crosstok"}}
    with pytest.raises(ConfigError, match="temperature 1"):
        config_from_dict(raw | {"cache": {"dir": str(tmp_path / "c"), "temperature": 2.0}})
    for bad in ({"seq_kd": True}, {"mode": "sampled_token"}):
        with pytest.raises(ConfigError, match="not built for different tokenizers"):
            config_from_dict(raw | {"on_policy": {"max_new_tokens": 8, **bad}})


def _cross_cache_config(teacher, student, data, tmp_path, **cache):
    raw = run_config(teacher, student, data, tmp_path / "out")
    raw["data"]["limit"] = 12
    raw["objectives"] = {"x": {"type": "crosstok", "method": "alm", "binarization_temperature": 1.0}}
    raw["cache"] = {"dir": str(tmp_path / "cache"), "k": 4, "batch_size": 4, "logprob_bits": 16, **cache}
    return raw


def test_alm_from_a_cache_of_the_teachers_own_tokens_equals_the_loaded_teacher(other_vocab_teacher, tiny_causal,
                                                                              alpaca_small, tmp_path):
    """The cache stores the teacher's view "xt" in its vocabulary with every actual token forced into the k, so
    alm (which reads only those tokens' log-probs) trains from it as from the loaded teacher, up to log-prob
    quantisation (16 bits), with no teacher model in memory."""
    from kdistill.recipes.lm import build_cache
    from kdistill.teachers.topk_store import TopKStore

    raw = _cross_cache_config(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path)
    stats = build_cache(config_from_dict(raw), progress=False)["train"]
    store = TopKStore(tmp_path / "cache" / "train")
    assert store.meta["view"] == TEACHER_VIEW and store.codec.vocab_size == 300 and store.codec.k == 4
    live = prepare(config_from_dict(raw | {"cache": {}}))
    cached = prepare(config_from_dict(raw))
    assert cached.teacher is None and cached.trainer.teacher.view == TEACHER_VIEW
    rows = [cached.trainer.train_dataset[i] for i in range(4)]
    for row in rows:  # the teacher's own tokens, each position's actual next token among the stored k
        targets = [t for t in row[f"{TEACHER_VIEW}_labels"][1:] if t != -100]
        assert row["teacher_topk_indices"].shape == (len(targets), 4)
        assert all(t in ids for t, ids in zip(targets, row["teacher_topk_indices"].tolist()))
    assert stats["tokens"] == sum(len(store.get(i)[0]) for i in range(len(store)))
    batch = cached.trainer.data_collator(rows)
    live_batch = {k: v for k, v in batch.items() if not k.startswith("teacher_topk")}
    for prepared in (live, cached):
        prepared.student.eval()
    with torch.no_grad():
        got = cached.trainer.compute_loss(cached.student, dict(batch))
        expected = live.trainer.compute_loss(live.student, dict(live_batch))
    assert got.item() == pytest.approx(expected.item(), rel=1e-3)


def test_a_cross_tokenizer_cache_is_checked_against_the_teachers_tokens(other_vocab_teacher, tiny_causal,
                                                                        alpaca_small, tmp_path):
    from kdistill.recipes.lm import build_cache
    from kdistill.teachers.topk_cache import CacheMismatchError

    raw = _cross_cache_config(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path)
    build_cache(config_from_dict(raw), progress=False)
    same_tokens = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path / "o")
    same_tokens["data"]["limit"] = 12
    same_tokens["cache"] = raw["cache"]
    with pytest.raises(CacheMismatchError, match="token view 'xt'"):  # a plain kd run cannot read it
        prepare(config_from_dict(same_tokens))
    with pytest.raises(CacheMismatchError, match="examples"):
        prepare(config_from_dict(raw | {"data": raw["data"] | {"limit": 8}}))
    other_teacher = raw | {"teacher": {"name_or_path": other_vocab_teacher, "tokenizer": tiny_causal["student"]}}
    with pytest.raises(CacheMismatchError, match="another tokenizer"):
        prepare(config_from_dict(other_teacher))


def test_alm_from_a_served_teacher_equals_the_loaded_teacher(other_vocab_teacher, tiny_causal, alpaca_small,
                                                            tmp_path):
    """alm reads only the teacher's log-probs of its own tokens, which a server returns exactly."""
    from test_served_teacher import Served

    objectives = {"x": {"type": "crosstok", "method": "alm", "binarization_temperature": 1.0}}
    local, _ = _loss(_prepared(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path, objectives))
    with Served(other_vocab_teacher) as server:
        raw = run_config(None, tiny_causal["student"], alpaca_small, tmp_path / "served")
        raw["teacher"] = {"tokenizer": other_vocab_teacher,
                          "server": {"url": server.url, "model": "teacher", "top_k": 4, "max_retries": 1}}
        raw["objectives"] = objectives
        served, _ = _loss(prepare(config_from_dict(raw)))
    assert served == pytest.approx(local, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["alm", "gold"])
def test_training_across_tokenizers_moves_the_student_toward_the_teacher(method, other_vocab_teacher, tiny_causal,
                                                                        alpaca_small, tmp_path):
    rows = [json.loads(line) for line in alpaca_small.read_text().splitlines()]
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:160]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[160:]))
    objectives = {"x": {"type": "crosstok", "method": method, "binarization_temperature": 1.0}}

    def held_out_loss(student):
        prepared = _prepared(other_vocab_teacher, student, held, tmp_path, objectives)
        trainer = prepared.trainer
        prepared.student.eval()
        with torch.no_grad():
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
            return float(trainer.compute_loss(prepared.student, batch))

    before = held_out_loss(tiny_causal["student"])
    raw = run_config(other_vocab_teacher, tiny_causal["student"], train, tmp_path / "trained", max_steps=40,
                     learning_rate=3e-3, per_device_train_batch_size=8)
    raw["objectives"] = objectives
    run_training(config_from_dict(raw), resume=False)
    after = held_out_loss(str(tmp_path / "trained"))
    assert after < 0.8 * before, (before, after)


def test_a_cross_tokenizer_cache_written_from_a_served_teacher_equals_the_loaded_teachers(other_vocab_teacher,
                                                                                         tiny_causal, alpaca_small,
                                                                                         tmp_path):
    from test_served_teacher import Served

    from kdistill.recipes.lm import build_cache
    from kdistill.teachers.topk_store import TopKStore

    local = _cross_cache_config(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path / "local")
    build_cache(config_from_dict(local), progress=False)
    with Served(other_vocab_teacher) as server:
        raw = _cross_cache_config(None, tiny_causal["student"], alpaca_small, tmp_path / "served")
        raw["teacher"] = {"tokenizer": other_vocab_teacher,
                          "server": {"url": server.url, "model": "teacher", "top_k": 4, "max_retries": 1}}
        build_cache(config_from_dict(raw), progress=False)
    a, b = TopKStore(tmp_path / "local" / "cache" / "train"), TopKStore(tmp_path / "served" / "cache" / "train")
    assert len(a) == len(b) > 0 and b.meta["view"] == TEACHER_VIEW
    for i in range(len(a)):
        (ids_a, lp_a), (ids_b, lp_b) = a.get(i), b.get(i)
        assert (ids_a == ids_b).mean() > 0.99  # ties at the k-th entry may order differently
        assert abs(lp_a - lp_b).max() < 1e-3


def _on_policy_config(teacher, student, data, out, **training):
    raw = run_config(teacher, student, data, out, **training)
    raw["objectives"] = {"x": {"type": "crosstok", "method": "alm", "binarization_temperature": 1.0}}
    raw["on_policy"] = {"max_new_tokens": 12}
    return raw


def _on_policy_prepared(teacher, student, data, tmp_path, max_length=128):
    raw = _on_policy_config(teacher, student, data, tmp_path / "op")
    raw["data"]["max_length"] = max_length
    return prepare(config_from_dict(raw))


def test_on_policy_answers_are_given_to_the_teacher_in_its_own_tokens(other_vocab_teacher, tiny_causal,
                                                                     alpaca_small, tmp_path):
    from kdistill.config import ModelConfig
    from kdistill.data.cross_rows import TEACHER_PROMPT_LENGTH
    from kdistill.models import load_tokenizer

    prepared = _on_policy_prepared(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path)
    trainer = prepared.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    (out,), logs = trainer.on_policy.prepare([dict(batch)], 0, prepared.student)
    assert out["sampled_by"] == "student" and logs["on_policy/student_answer_length"] > 0
    s_tok = load_tokenizer(ModelConfig(name_or_path=tiny_causal["student"]))
    t_tok = load_tokenizer(ModelConfig(name_or_path=other_vocab_teacher))
    chunked = 0
    for i in range(4):
        p, q = int(batch["prompt_length"][i]), int(batch[TEACHER_PROMPT_LENGTH][i])
        # each side keeps its own prompt; the answers follow
        assert torch.equal(out["input_ids"][i, :p], batch["input_ids"][i, :p])
        assert torch.equal(out[f"{TEACHER_VIEW}_input_ids"][i, :q], batch[f"{TEACHER_VIEW}_input_ids"][i, :q])
        s_ids, t_ids = out["input_ids"][i].tolist(), out[f"{TEACHER_VIEW}_input_ids"][i].tolist()
        s_chunks, t_chunks = out[CHUNK_KEYS[0]][i].tolist(), out[CHUNK_KEYS[1]][i].tolist()
        for c in sorted(set(s_chunks) - {-1}):  # every chunk spells the same text on both sides
            s_text = s_tok.decode([t for t, k in zip(s_ids, s_chunks) if k == c])
            t_text = t_tok.decode([t for t, k in zip(t_ids, t_chunks) if k == c])
            assert s_text.strip() == t_text.strip(), (c, s_text, t_text)
            chunked += 1
        assert set(s_chunks) == set(t_chunks)
    assert chunked > 0
    with torch.no_grad():
        loss = trainer.compute_loss(prepared.student, out)
    assert torch.isfinite(loss) and loss > 0


def test_a_non_canonical_sampled_answer_is_scored_on_its_text(other_vocab_teacher, tiny_causal, alpaca_small,
                                                             tmp_path):
    """A student may sample a word in pieces its tokenizer would not choose; the teacher scores the text, and the
    student is trained on the canonical tokens of that text (counted as retokenized)."""
    from kdistill.data.cross_samples import SampledAnswerAligner
    from kdistill.config import ModelConfig
    from kdistill.models import load_tokenizer

    s_tok = load_tokenizer(ModelConfig(name_or_path=tiny_causal["student"]))
    t_tok = load_tokenizer(ModelConfig(name_or_path=other_vocab_teacher))
    prepared = _on_policy_prepared(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path)
    batch = prepared.trainer.data_collator([prepared.trainer.train_dataset[0]])
    p = int(batch["prompt_length"][0])
    text = " the water is"
    canonical = s_tok(text, add_special_tokens=False)["input_ids"]
    pieces = [s_tok.convert_tokens_to_ids(ch) for ch in s_tok.convert_ids_to_tokens(canonical)[0]] + canonical[1:]
    assert pieces != canonical and s_tok.decode(pieces) == s_tok.decode(canonical)
    eos = s_tok.eos_token_id
    for answer, retokenized in ((canonical, 0), (pieces, 1)):
        ids = batch["input_ids"][0, :p].tolist() + answer + [eos]
        sampled = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                   "labels": torch.tensor([[-100] * p + answer + [eos]]), "sampled_by": "student"}
        out, counts = SampledAnswerAligner(s_tok, t_tok, (eos,))(batch, sampled)
        assert counts == {"retokenized": retokenized, "unaligned": 0}
        assert out["input_ids"][0].tolist() == batch["input_ids"][0, :p].tolist() + canonical + [eos]
        assert out["labels"][0, -1] == eos and out[CHUNK_KEYS[0]][0, -1] == -1  # the stop: trained, in no chunk
        t_answer = [t for t, k in zip(out[f"{TEACHER_VIEW}_input_ids"][0].tolist(), out[CHUNK_KEYS[1]][0].tolist())
                    if k >= 0]
        assert t_tok.decode(t_answer).strip() == text.strip()


@pytest.mark.slow
def test_on_policy_training_across_tokenizers_runs(other_vocab_teacher, tiny_causal, alpaca_small, tmp_path):
    raw = _on_policy_config(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path / "op", max_steps=2,
                            per_device_train_batch_size=4)
    run_training(config_from_dict(raw), resume=False)
    logs = json.loads((tmp_path / "op" / "kdistill_summary.json").read_text())["log_history"]
    first = logs[0]
    assert first["on_policy/student_answer_length"] > 0 and first["loss/x"] > 0
    assert 0 <= first["on_policy/student_retokenized"] <= 1


def test_prompt_only_rows_are_cut_before_the_answer_on_both_sides(other_vocab_teacher, tiny_causal, alpaca_small,
                                                                 tmp_path):
    from kdistill.data.cross_rows import TEACHER_PROMPT_LENGTH

    rows = [json.loads(line) for line in alpaca_small.read_text().splitlines()[:6]]
    answers, prompts = tmp_path / "answers.jsonl", tmp_path / "prompts.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "output"}) + "\n" for r in rows))
    answered = _on_policy_prepared(other_vocab_teacher, tiny_causal["student"], answers, tmp_path / "a", 1024)
    prompts = _on_policy_prepared(other_vocab_teacher, tiny_causal["student"], prompts, tmp_path / "p", 1024)
    assert len(answered.trainer.train_dataset) == len(prompts.trainer.train_dataset) == 6
    for i in range(6):
        full, cut = answered.trainer.train_dataset[i], prompts.trainer.train_dataset[i]
        for prefix, length in (("", "prompt_length"), (f"{TEACHER_VIEW}_", TEACHER_PROMPT_LENGTH)):
            assert cut[length] == full[length] == len(cut[f"{prefix}input_ids"])
            assert cut[f"{prefix}input_ids"] == full[f"{prefix}input_ids"][:full[length]]
            assert set(cut[f"{prefix}labels"]) == {-100}


def test_on_policy_answers_scored_by_a_served_teacher_equal_the_loaded_teacher(other_vocab_teacher, tiny_causal,
                                                                              alpaca_small, tmp_path):
    from test_served_teacher import Served

    local = _on_policy_prepared(other_vocab_teacher, tiny_causal["student"], alpaca_small, tmp_path / "local")
    batch = local.trainer.data_collator([local.trainer.train_dataset[i] for i in range(4)])
    (sampled,), _ = local.trainer.on_policy.prepare([dict(batch)], 0, local.student)
    local.student.eval()
    with torch.no_grad():
        expected = float(local.trainer.compute_loss(local.student, dict(sampled)))
    with Served(other_vocab_teacher) as server:
        raw = _on_policy_config(None, tiny_causal["student"], alpaca_small, tmp_path / "served")
        raw["data"]["max_length"] = 128
        raw["teacher"] = {"tokenizer": other_vocab_teacher,
                          "server": {"url": server.url, "model": "teacher", "top_k": 4, "max_retries": 1}}
        served = prepare(config_from_dict(raw))
        with torch.no_grad():
            got = float(served.trainer.compute_loss(local.student, dict(sampled)))
    assert got == pytest.approx(expected, rel=1e-4)
