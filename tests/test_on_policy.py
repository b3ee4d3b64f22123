"""On-policy distillation (issue #15): the sampled-token estimator, scoring of sampled answers, masks, equivalences,
bad input and an end-to-end run on prompt-only data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO, run_config
from kdistill.batch import SAMPLED_BY
from kdistill.config import ConfigError, ModelConfig, OnPolicyConfig, config_from_dict
from kdistill.data import DataValidationError
from kdistill.data.prompt_rows import encode_for_sampling
from kdistill.data.records import load_rows
from kdistill.losses.policy import discounted_advantages, sampled_token_loss
from kdistill.models import load_model, load_tokenizer
from kdistill.onpolicy import HFGenerate, SamplingParams, answer_lengths, sampled_batch
from kdistill.pipeline import prepare, run_training


# ------------------------------------------------------------------------------ the estimator on a toy model
V, T = 3, 3  # vocabulary 3, length 3: 27 sequences, enumerable


def _prefix_index(x: torch.Tensor, t: int) -> torch.Tensor:
    """Row of the tabular policy that position t reads: 0 for the empty prefix, then 1 + x0, then 4 + 3 x0 + x1."""
    if t == 0:
        return torch.zeros(x.shape[0], dtype=torch.long)
    if t == 1:
        return 1 + x[:, 0]
    return 4 + 3 * x[:, 0] + x[:, 1]


def _logprobs(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, T) log P(x_t | x_<t) under a tabular policy (13, V)."""
    return torch.stack([table[_prefix_index(x, t)].log_softmax(-1).gather(-1, x[:, t:t + 1]).squeeze(-1)
                        for t in range(T)], dim=1)


def _all_sequences() -> torch.Tensor:
    return torch.cartesian_prod(*[torch.arange(V)] * T)


def _exact_gradient(student: torch.Tensor, teacher: torch.Tensor, discount: float) -> torch.Tensor:
    """discount 1: grad of KL(P_s(x) || P_t(x)) over whole sequences; discount 0: grad of sum_t E_{prefix ~ P_s,
    held fixed} KL(P_s(.|prefix) || P_t(.|prefix))."""
    theta = student.clone().requires_grad_(True)
    xs = _all_sequences()
    ls, lt = _logprobs(theta, xs), _logprobs(teacher, xs)
    if discount == 1.0:
        objective = (ls.sum(1).exp() * (ls.sum(1) - lt.sum(1))).sum()
    else:
        objective = 0.0
        for t in range(T):
            prefix_prob = ls[:, :t].sum(1).exp().detach()
            rows = xs[:, t:].eq(0).all(1)  # one sequence per prefix x_<t (its tokens from t on all 0)
            p_log = theta[_prefix_index(xs[rows], t)].log_softmax(-1)
            t_log = teacher[_prefix_index(xs[rows], t)].log_softmax(-1)
            objective = objective + (prefix_prob[rows] * (p_log.exp() * (p_log - t_log)).sum(-1)).sum()
    (grad,) = torch.autograd.grad(objective, theta)
    return grad


def _sampled_gradient(student, teacher, discount, n=200_000, loss_fn=sampled_token_loss) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(n, T, dtype=torch.long)
    for t in range(T):
        probs = student[_prefix_index(x, t)].softmax(-1)
        x[:, t] = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    theta = student.clone().requires_grad_(True)
    loss = loss_fn(_logprobs(theta, x), _logprobs(teacher, x), torch.ones(n, T, dtype=torch.bool), discount, n)
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


def _relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("discount", [0.0, 1.0])
def test_sampled_token_estimator_matches_the_exact_gradient(discount):
    torch.manual_seed(1)
    student, teacher = torch.randn(13, V), torch.randn(13, V) * 1.5
    exact = _exact_gradient(student, teacher, discount)
    assert _relative_error(_sampled_gradient(student, teacher, discount), exact) < 0.05

    # the test tells a broken estimator apart: a wrong sign, a missing stop-gradient, an advantage shifted by one
    def no_stop_gradient(ls, lt, mask, disc, n):
        return -((lt - ls) * ls).sum() / n

    def shifted(ls, lt, mask, disc, n):
        adv = discounted_advantages(ls, lt, mask, disc)
        return -(torch.roll(adv, 1, dims=1) * ls).sum() / n

    def flipped(*args):
        return -sampled_token_loss(*args)

    for broken in (no_stop_gradient, shifted, flipped):
        assert _relative_error(_sampled_gradient(student, teacher, discount, 50_000, broken), exact) > 0.2


def test_sampled_token_loss_value_is_the_reverse_kl_estimate():
    ls = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    lt = torch.log(torch.tensor([[0.25, 0.25, 0.1]]))
    mask = torch.tensor([[True, True, False]])
    loss = sampled_token_loss(ls, lt, mask)
    assert float(loss) == pytest.approx(float((ls - lt)[mask].mean()))
    adv = discounted_advantages(ls, lt, mask, 0.5)
    r = (lt - ls)[0]
    assert adv[0].tolist() == pytest.approx([float(r[0] + 0.5 * r[1]), float(r[1]), 0.0])


# ------------------------------------------------------------------------------------- sampled micro-batches
def test_answers_are_trained_through_their_first_stop_and_prompts_never():
    eos = 2  # pad == eos
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 2, 2], [5, 6, 9, 9, 9, 9]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]),
             "labels": torch.full((2, 6), -100), "prompt_length": torch.tensor([3, 2])}
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([5, 6])]
    new = torch.tensor([[11, 2, 2, 2], [12, 13, 14, 15]])  # row 0 stops at once (pad after it), row 1 never
    out, stats = sampled_batch(batch, prompts, new, (eos,), 4, eos, "student")
    assert out[SAMPLED_BY] == "student"
    assert out["input_ids"].tolist() == [[5, 6, 7, 11, 2, 2], [5, 6, 12, 13, 14, 15]]
    assert out["labels"].tolist() == [[-100, -100, -100, 11, 2, -100], [-100, -100, 12, 13, 14, 15]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert (stats.answers, stats.tokens, stats.truncated) == (2, 6, 1)
    lengths, cut = answer_lengths(torch.tensor([[2, 2, 2]]), (2,), 3)
    assert lengths.tolist() == [1] and cut.tolist() == [False]


def _prepared(pair, data, tmp_path, on_policy=None, objectives=None, **extra):
    raw = run_config(pair["teacher"], pair["student"], data, tmp_path / "out")
    raw["objectives"] = objectives or {"kd": {"divergence": "reverse_kl"}}
    raw["on_policy"] = {"max_new_tokens": 8, **(on_policy or {})}
    raw.update(extra)
    return prepare(config_from_dict(raw))


def _sampled(prepared, rows=4, step=0):
    trainer = prepared.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    batches, logged = trainer.on_policy.prepare([batch], step, trainer.model)
    return batches[0], logged


def _student_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_divergence_on_samples_equals_the_dense_divergence_by_hand(kind, tiny_causal, tiny_t5, alpaca_small,
                                                                    tmp_path):
    pair = tiny_causal if kind == "causal" else tiny_t5
    prepared = _prepared(pair, alpaca_small, tmp_path)
    batch, logged = _sampled(prepared)
    assert logged["on_policy/student_answer_length"] > 0
    model, trainer = prepared.student, prepared.trainer
    model.eval()
    loss = trainer.compute_loss(model, batch)
    teacher = load_model(ModelConfig(name_or_path=pair["teacher"]))
    with torch.no_grad():
        if kind == "t5":
            dec = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
            s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec).logits
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=dec).logits
            targets = batch["labels"]
        else:
            s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
    mask = targets.ne(-100)
    vocab = trainer.kd_vocab
    ls, lt = s[mask][:, :vocab].double().log_softmax(-1), t[mask][:, :vocab].double().log_softmax(-1)
    by_hand = (ls.exp() * (ls - lt)).sum(-1).mean()
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-4)


@pytest.mark.parametrize("chunked", [False, True])
def test_sampled_token_mode_gradient_by_hand(chunked, tiny_causal, alpaca_small, tmp_path):
    prepared = _prepared(tiny_causal, alpaca_small, tmp_path, on_policy={"mode": "sampled_token", "discount": 0.5},
                         chunked_loss={"mode": "on" if chunked else "off", "chunk_size": 7})
    batch, _ = _sampled(prepared)
    model, trainer = prepared.student, prepared.trainer
    model.eval()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    got = _student_grads(model).clone()
    model.zero_grad()
    teacher = load_model(ModelConfig(name_or_path=tiny_causal["teacher"]))
    targets = batch["labels"][:, 1:]
    mask = targets.ne(-100)
    safe = targets.clamp(min=0).unsqueeze(-1)
    vocab = trainer.kd_vocab
    s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab]
    ls = s.float().log_softmax(-1).gather(-1, safe).squeeze(-1)
    lt = t.float().log_softmax(-1).gather(-1, safe).squeeze(-1)
    r = (lt - ls.detach()) * mask
    adv = torch.zeros_like(r)
    running = torch.zeros(r.shape[0])
    for i in range(r.shape[1] - 1, -1, -1):  # discount 0.5, restarted outside the answer
        running = (r[:, i] + 0.5 * running) * mask[:, i]
        adv[:, i] = running
    (-(adv * ls)[mask].sum() / mask.sum()).backward()
    assert float(loss) == pytest.approx(float(-r[mask].mean()), rel=1e-4)
    assert torch.allclose(got, _student_grads(model), atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("mode", ["divergence", "sampled_token"])
def test_teacher_equal_to_student_gives_zero_loss_and_gradient(mode, tiny_causal, alpaca_small, tmp_path):
    pair = {"teacher": tiny_causal["student"], "student": tiny_causal["student"]}
    prepared = _prepared(pair, alpaca_small, tmp_path, on_policy={"mode": mode})
    batch, _ = _sampled(prepared)
    model = prepared.student
    model.eval()
    loss = prepared.trainer.compute_loss(model, batch)
    loss.backward()
    assert abs(float(loss)) < 1e-6
    assert _student_grads(model).abs().max() < 1e-6


def test_prompt_and_post_stop_positions_get_no_gradient(tiny_causal, alpaca_small, tmp_path):
    prepared = _prepared(tiny_causal, alpaca_small, tmp_path)
    batch, _ = _sampled(prepared)
    model = prepared.student
    model.eval()
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = model.lm_head.register_forward_hook(keep)
    try:
        prepared.trainer.compute_loss(model, batch).backward()
    finally:
        handle.remove()
    grad = captured["logits"].grad.abs().sum(-1)  # (B, T)
    predicts_answer = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_answer[:, :-1] = batch["labels"][:, 1:].ne(-100)
    assert grad[~predicts_answer].max() == 0
    assert (grad[predicts_answer] > 0).all()
    prompt_lengths = [int(n) for n in prepared.trainer.data_collator(
        [prepared.trainer.train_dataset[i] for i in range(4)])["prompt_length"]]
    assert len(set(prompt_lengths)) > 1  # variable-length prompts in the batch


def test_samples_do_not_depend_on_the_batch_they_are_drawn_in(tiny_causal, alpaca_small, tmp_path):
    prepared = _prepared(tiny_causal, alpaca_small, tmp_path)
    trainer = prepared.trainer
    rows = [trainer.train_dataset[i] for i in range(4)]
    whole, _ = trainer.on_policy.prepare([trainer.data_collator(rows)], 0, trainer.model)
    halves, _ = trainer.on_policy.prepare([trainer.data_collator(rows[:2]), trainer.data_collator(rows[2:])], 0,
                                          trainer.model)

    def answers(b):
        return [ids[lab.ne(-100)].tolist() for ids, lab in zip(b["input_ids"], b["labels"])]

    assert answers(whole[0]) == answers(halves[0]) + answers(halves[1])
    other, _ = trainer.on_policy.prepare([trainer.data_collator(rows)], 1, trainer.model)
    assert answers(other[0]) != answers(whole[0])  # another step, other draws


def test_sampling_keeps_to_top_k_and_the_vocabulary_limit(tiny_causal):
    model = load_model(ModelConfig(name_or_path=tiny_causal["student"]))
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_causal["student"]))
    ids = torch.tensor([tok("Give three tips")["input_ids"]])
    params = SamplingParams(max_new_tokens=6, top_k=1, stop_ids=(), pad_id=tok.pad_token_id)
    sampled = HFGenerate().generate(model, ids, torch.ones_like(ids), [1], params)
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)[:, ids.shape[1]:]
    assert sampled.tolist() == greedy.tolist()  # top_k 1 is greedy
    limited = HFGenerate().generate(model, ids, torch.ones_like(ids), [1, ], SamplingParams(
        max_new_tokens=20, stop_ids=(), pad_id=tok.pad_token_id, vocab_limit=50))
    assert int(limited.max()) < 50


def test_lora_student_samples_through_its_adapter(tiny_causal, alpaca_small, tmp_path):
    prepared = _prepared(tiny_causal, alpaca_small, tmp_path, lora={"enabled": True, "r": 4, "alpha": 8})
    batch, logged = _sampled(prepared)
    assert logged["on_policy/student_answer_length"] > 0
    model = prepared.student
    prepared.trainer.compute_loss(model, batch).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in n for n in trained)


def test_coin_flip_is_a_function_of_seed_and_step(tiny_causal, alpaca_small, tmp_path):
    prepared = _prepared(tiny_causal, alpaca_small, tmp_path, on_policy={"lmbda": 0.3})
    policy = prepared.trainer.on_policy
    flips = [policy.is_on_policy(s) for s in range(400)]
    assert flips == [policy.is_on_policy(s) for s in range(400)]
    assert 0.22 < sum(flips) / 400 < 0.38
    assert policy.fraction(400) == pytest.approx(sum(flips) / 400)
    assert policy.fraction(100) == pytest.approx(sum(flips[:100]) / 100)


# ------------------------------------------------------------------------------------------- equivalences
def _losses(summary):
    return [(h["loss"], h.get("loss/kd")) for h in summary["log_history"] if "loss" in h]


def test_lmbda_zero_reproduces_off_policy_training(tiny_causal, alpaca_small, tmp_path):
    base = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path / "off", max_steps=3)
    base["objectives"] = {"kd": {"divergence": "forward_kl"}}
    off = run_training(config_from_dict(base), resume=False)
    on = run_training(config_from_dict({**base, "on_policy": {"lmbda": 0.0},
                                        "training": {**base["training"], "output_dir": str(tmp_path / "on")}}),
                      resume=False)
    assert _losses(on) == _losses(off)
    assert all(h.get("on_policy/fraction") == 0.0 for h in on["log_history"] if "loss" in h)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(tiny_causal, alpaca_small, tmp_path):
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, tmp_path / "full", max_steps=2)
    raw["objectives"] = {"kd": {"divergence": "reverse_kl"}}
    raw["on_policy"] = {"max_new_tokens": 8}
    full = run_training(config_from_dict(raw), resume=False)
    raw["training"] = {**raw["training"], "output_dir": str(tmp_path / "acc"), "per_device_train_batch_size": 2,
                       "gradient_accumulation_steps": 2}
    acc = run_training(config_from_dict(raw), resume=False)
    for (a, b) in zip(_losses(full), _losses(acc)):
        assert a == pytest.approx(b, rel=1e-5)
    keys = ("grad_norm", "on_policy/student_answer_length", "kd/teacher_nll")
    for h_full, h_acc in zip(full["log_history"], acc["log_history"]):
        for key in keys:
            if key in h_full:
                assert h_acc[key] == pytest.approx(h_full[key], rel=1e-4), key


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("on_policy, objectives, extra, message", [
    ({}, {"hidden": {}}, {}, "cannot score sampled answers"),
    ({}, {"ce": {}, "kd": {}}, {}, "repeat its own samples"),
    ({}, {"kd": {}}, {"cache": {"dir": "cache"}}, "cache.dir"),
    ({"lmbda": 1.5}, {"kd": {}}, {}, "lmbda: must be <= 1"),
    ({"lmbda": -0.1}, {"kd": {}}, {}, "lmbda: must be >= 0"),
    ({"top_p": 0.0}, {"kd": {}}, {}, "top_p: must be > 0"),
    ({"max_new_tokens": 0}, {"kd": {}}, {}, "max_new_tokens: must be >= 1"),
    ({"mode": "sampled_token"}, {"kd": {"temperature": 2.0}}, {}, "loss temperature 1"),
])
def test_config_errors(on_policy, objectives, extra, message, tmp_path):
    raw = run_config("teacher", "student", tmp_path / "d.jsonl", tmp_path / "out")
    raw.update({"on_policy": on_policy, "objectives": objectives, **extra})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    from kdistill.config import load_config
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_on_policy_section_round_trips_and_defaults():
    cfg = OnPolicyConfig()
    assert (cfg.lmbda, cfg.seq_kd, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.mode) == \
        (1.0, False, 128, 1.0, 1.0, "divergence")


def _prompt_only(tmp_path, n=40):
    rows = [{"instruction": f"Name a colour number {i}."} for i in range(n)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_only_rows_need_on_policy(tiny_causal, tmp_path):
    data = _prompt_only(tmp_path)
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], data, tmp_path / "out")
    with pytest.raises(DataValidationError, match=r"prompts.jsonl:1: .*output.*\n(.|\n)*on_policy"):
        prepare(config_from_dict(raw))
    raw["on_policy"] = {"lmbda": 0.5}
    raw["objectives"] = {"kd": {}}
    with pytest.raises(DataValidationError, match=r"prompts.jsonl:1: no response .*seq_kd"):
        prepare(config_from_dict(raw))
    raw["on_policy"]["seq_kd"] = True  # the teacher answers the off-policy steps
    prepared = prepare(config_from_dict(raw))
    batch = prepared.trainer.data_collator([prepared.trainer.train_dataset[i] for i in range(4)])
    step = next(s for s in range(20) if not prepared.trainer.on_policy.is_on_policy(s))
    batches, logged = prepared.trainer.on_policy.prepare([batch], step, prepared.trainer.model,
                                                         prepared.trainer.teacher.model)
    assert batches[0][SAMPLED_BY] == "teacher" and "on_policy/teacher_answer_length" in logged


# ------------------------------------------------------------------------------------------------ end to end
def _reverse_kl_on_own_samples(student_path, teacher_path, prompts, seed=123):
    """Mean per-token KL(P_s || P_t) over the student's sampled answers to `prompts`."""
    tok = load_tokenizer(ModelConfig(name_or_path=student_path))
    student = load_model(ModelConfig(name_or_path=student_path))
    teacher = load_model(ModelConfig(name_or_path=teacher_path))
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    params = SamplingParams(max_new_tokens=24, stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    new = HFGenerate().generate(student, ids, mask, [seed + i for i in range(len(prompts))], params)
    batch = {"input_ids": ids, "attention_mask": mask}
    out, _ = sampled_batch(batch, [torch.tensor(p) for p in prompts], new, params.stop_ids, 24, tok.pad_token_id,
                           "student")
    with torch.no_grad():
        s = student(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits[:, :-1]
    m = out["labels"][:, 1:].ne(-100)
    vocab = len(tok)
    ls, lt = s[m][:, :vocab].log_softmax(-1), t[m][:, :vocab].log_softmax(-1)
    return float((ls.exp() * (ls - lt)).sum(-1).mean())


@pytest.mark.slow
def test_cli_run_on_prompt_only_data_moves_the_student_toward_the_teacher(tiny_causal, alpaca_small, tmp_path):
    rows = [json.loads(line) for line in alpaca_small.read_text().splitlines()]
    train, held = rows[:160], rows[160:176]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": r["instruction"], "input": r["input"]}) + "\n" for r in train))
    raw = run_config(tiny_causal["teacher"], tiny_causal["student"], data, tmp_path / "out", max_steps=30,
                     learning_rate=3e-3, per_device_train_batch_size=8)
    raw["on_policy"] = {"max_new_tokens": 24}
    raw["objectives"] = {"kd": {"divergence": "reverse_kl"}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "kdistill.cli", "train", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_causal["student"]))
    examples = load_rows([{"instruction": r["instruction"], "input": r["input"]} for r in held], "held",
                         require_response=False).examples
    encoded, _, _ = encode_for_sampling(examples, tok, max_length=64)
    prompts = [row["input_ids"][:row["prompt_length"]] for row in encoded]
    before = _reverse_kl_on_own_samples(tiny_causal["student"], tiny_causal["teacher"], prompts)
    after = _reverse_kl_on_own_samples(str(tmp_path / "out"), tiny_causal["teacher"], prompts)
    assert after < 0.8 * before, (before, after)
    logs = json.loads((tmp_path / "out" / "kdistill_summary.json").read_text())["log_history"]
    assert all("kd/teacher_nll" in h and "on_policy/student_answer_length" in h for h in logs if "loss" in h)


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_an_interrupted_on_policy_run_resumes_to_the_uninterrupted_result(tiny_causal, alpaca_small, tmp_path):
    """The coin flips and every answer's seed are functions of the step: a resumed run samples what the
    uninterrupted one did, and ends with the same student."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Crash

    def cfg(out):
        raw = run_config(tiny_causal["teacher"], tiny_causal["student"], alpaca_small, out, max_steps=6,
                         save_strategy="steps", save_steps=2, seed=0)
        raw["on_policy"] = {"lmbda": 0.9, "max_new_tokens": 8}  # seed 42: steps 0-1 off-policy, 2-5 on
        raw["objectives"] = {"kd": {"divergence": "reverse_kl"}}
        return config_from_dict(raw)

    straight = run_training(cfg(tmp_path / "straight"), resume=False)
    with pytest.raises(_Crash):
        run_training(cfg(tmp_path / "killed"), callbacks=[CrashAt()], resume=False)
    resumed = run_training(cfg(tmp_path / "killed"))
    assert resumed["resumed_from"].endswith("checkpoint-2")
    flips = {h["step"]: h["on_policy/fraction"] for h in straight["log_history"] if "loss" in h}
    assert 0 < flips[6] < 1  # both kinds of step happened
    after = {h["step"]: h["loss"] for h in resumed["log_history"] if "loss" in h}
    for step in (3, 4, 5, 6):
        expected = next(h["loss"] for h in straight["log_history"] if h.get("step") == step and "loss" in h)
        assert after[step] == pytest.approx(expected, rel=1e-4)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
