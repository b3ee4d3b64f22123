"""Zero-shot classification evaluation of (distilled) generative models.

Two scorers:

* ``loglik`` (default): for every example and every label, the log-probability the model gives to the
  label's verbaliser (``task.answer_prefix + verbalizer``, e.g. ``" supported"``) right after the prompt.
  Causal LMs see ``prompt + verbaliser`` as one sequence (the prompt's tokens, with the tokenizer's BOS
  prepended when it has one, followed by the verbaliser's tokens, each tokenised on its own) and only the
  verbaliser tokens are scored; seq2seq models (T5) get the prompt in the encoder (with the tokenizer's
  special tokens, T5 appends ``</s>``) and the verbaliser tokens as decoder labels (no ``</s>``). The
  prediction is the argmax over labels. Default: the SUM of the token log-probabilities
  (``length_normalize=False``); ``length_normalize=True`` uses the mean per token instead, which stops
  long verbalisers being penalised for their length. Nothing is parsed, so there are no invalid answers.
* ``generate``: greedy generation (:class:`kdistill.generators.LocalTeacher`, raw prompt, no chat
  template) then :func:`kdistill.annotate.parse_label` over the verbalisers (then over the label names).
  An answer naming no single label is ``None``: counted as invalid (wrong) and never guessed.

Tasks and metrics live in :mod:`kdistill.evaluation.classify_tasks` (re-exported here). Metrics
(:func:`classification_metrics`) are computed in pure Python and match scikit-learn with
``labels=labels`` where invalid predictions are a prediction outside ``labels``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from kdistill.annotate import parse_label
from kdistill.errors import UserError
from kdistill.generators import LocalTeacher
from kdistill.models.heads import align_positions
from kdistill.evaluation.classify_tasks import (DEFAULT_DATA, N_EXAMPLES_KEPT, Examples, Task, classification_metrics,
                                               climate_fever_task, custom_task, get_task, hate_speech_task)
from kdistill.models.loader import load_pretrained

__all__ = ["Task", "Examples", "classification_metrics", "climate_fever_task", "hate_speech_task",
           "custom_task", "get_task", "loglik_predict", "generate_predict", "evaluate_classification",
           "format_table", "add_parser", "run_cli", "DEFAULT_DATA"]

def _load(model, tokenizer):
    from transformers import AutoTokenizer

    if isinstance(model, (str, Path)):
        name = str(model)
        model = load_pretrained(name, "--model")
        if tokenizer is None:
            tokenizer = name
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        source = tokenizer or getattr(model, "name_or_path", None)
        if not source:
            raise ValueError("tokenizer is required when the model was not loaded from a path")
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    return model.eval(), tokenizer


def _progress(done: int, total: int, enabled: bool) -> None:
    if enabled:
        print(f"\rclassify: {done}/{total}", end="\n" if done >= total else "", file=sys.stderr, flush=True)


def loglik_predict(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 16,
                   length_normalize: bool = False, progress: bool = False) -> list[list[float]]:
    """``scores[i][j]``: log P(continuations[j] | prompts[i]) (summed, or mean per token when
    ``length_normalize``). ``batch_size`` counts prompts; each forward pass holds
    ``batch_size * len(continuations)`` sequences."""
    import torch

    is_s2s = bool(getattr(model.config, "is_encoder_decoder", False))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0
    cont_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in continuations]
    if any(not ids for ids in cont_ids):
        raise ValueError("a verbaliser tokenises to no tokens")
    bos_id = getattr(tokenizer, "bos_token_id", None)

    def encode_prompt(text: str) -> list[int]:
        if is_s2s:
            return list(tokenizer(text, add_special_tokens=True)["input_ids"])
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if bos_id is not None and not (ids and ids[0] == bos_id):
            ids = [bos_id] + ids
        return ids

    prompt_ids = [encode_prompt(p) for p in prompts]
    if any(not ids for ids in prompt_ids):
        raise ValueError("an empty prompt cannot be scored (no tokens and no BOS)")
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    scores: list[list[float] | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    k = len(continuations)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            pairs = [(i, j) for i in idx for j in range(k)]
            if is_s2s:
                enc_w = max(len(prompt_ids[i]) for i in idx)
                dec_w = max(len(c) for c in cont_ids)
                enc = torch.full((len(pairs), enc_w), pad_id, dtype=torch.long)
                enc_mask = torch.zeros_like(enc)
                labels = torch.full((len(pairs), dec_w), -100, dtype=torch.long)
                for r, (i, j) in enumerate(pairs):
                    enc[r, :len(prompt_ids[i])] = torch.tensor(prompt_ids[i])
                    enc_mask[r, :len(prompt_ids[i])] = 1
                    labels[r, :len(cont_ids[j])] = torch.tensor(cont_ids[j])
                logits = model(input_ids=enc.to(device), attention_mask=enc_mask.to(device),
                               labels=labels.to(device)).logits
                target = labels
            else:
                seqs = [prompt_ids[i] + cont_ids[j] for i, j in pairs]
                width = max(len(s) for s in seqs)
                inp = torch.full((len(pairs), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(inp)
                target = torch.full((len(pairs), width), -100, dtype=torch.long)
                for r, ((i, j), seq) in enumerate(zip(pairs, seqs)):
                    inp[r, :len(seq)] = torch.tensor(seq)
                    mask[r, :len(seq)] = 1
                    p = len(prompt_ids[i])
                    target[r, p:len(seq)] = torch.tensor(cont_ids[j])
                logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits
            logits, target = align_positions(logits, target.to(device), is_s2s)
            logp = torch.log_softmax(logits.float(), dim=-1)
            valid = target != -100
            tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
            total = tok.sum(-1)
            if length_normalize:
                total = total / valid.sum(-1)
            total = total.tolist()
            for r, (i, j) in enumerate(pairs):
                if scores[i] is None:
                    scores[i] = [0.0] * k
                scores[i][j] = float(total[r])
            _progress(min(start + batch_size, len(order)), len(order), progress)
    return scores  # type: ignore[return-value]


def generate_predict(model, tokenizer, task: Task, prompts: Sequence[str], batch_size: int = 16,
                     max_new_tokens: int = 16) -> tuple[list[str | None], list[str]]:
    """Greedy answers and the labels parsed from them (``None`` when no single label is named)."""
    teacher = LocalTeacher(model, tokenizer=tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           do_sample=False, chat=False)
    outputs = teacher.generate(list(prompts), max_new_tokens=max_new_tokens, do_sample=False)
    verbs = [task.verbalizers[label] for label in task.labels]
    back = {task.verbalizers[label]: label for label in task.labels}
    preds = []
    for text in outputs:
        verb = parse_label(text, verbs)
        pred = back[verb] if verb is not None else parse_label(text, task.labels)
        preds.append(pred)
    return preds, outputs


def evaluate_classification(model, tokenizer, task: Task, scorer: str = "loglik", batch_size: int = 16,
                            limit: int | None = None, progress: bool = True, *, data: str | Path | None = None,
                            examples: Sequence | None = None, length_normalize: bool = False,
                            max_new_tokens: int = 16, split: str | None = None) -> dict:
    """Classify the task's rows (``examples`` if given, else ``task.load(data)``) and score them.

    ``model``: a loaded model or a folder (``tokenizer`` then defaults to it). Returns the metrics of
    :func:`classification_metrics` plus ``task``, ``scorer``, ``excluded`` (rows left out when loading),
    ``length_normalize`` (loglik) and ``examples``: the first 20 predictions (prompt, gold, pred and the
    per-label scores or the generated text).
    """
    if scorer not in ("loglik", "generate"):
        raise ValueError(f"scorer must be 'loglik' or 'generate', got {scorer!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if examples is None:  # the data first: a bad file or an unreachable hub id fails before a model loads
        examples = task.load(data, limit=limit, split=split)
        if not examples:
            excluded = ", ".join(f"{k}: {v}" for k, v in examples.excluded.items()) or "the file is empty"
            raise UserError(f"{data or task.default_data}: no row gives a {task.name} example (left out: {excluded}; "
                            f"each row needs {', '.join(repr(f) for f in task.text_fields)} and a "
                            f"{task.label_field!r} in {', '.join(task.labels)})")
    model, tokenizer = _load(model, tokenizer)
    excluded = dict(getattr(examples, "excluded", {}) or {})
    examples = list(examples)[:limit] if limit is not None else list(examples)
    prompts = [task.prompt(fields) for fields, _ in examples]
    golds = [gold for _, gold in examples]
    details: list[dict[str, Any]] = []
    if scorer == "loglik":
        conts = [task.answer_prefix + task.verbalizers[label] for label in task.labels]
        scores = loglik_predict(model, tokenizer, prompts, conts, batch_size=batch_size,
                                length_normalize=length_normalize, progress=progress) if prompts else []
        preds = [task.labels[max(range(len(s)), key=lambda j: s[j])] for s in scores]
        for p, g, pr, s in list(zip(prompts, golds, preds, scores))[:N_EXAMPLES_KEPT]:
            details.append({"prompt": p, "gold": g, "pred": pr, "scores": dict(zip(task.labels, s))})
    else:
        preds, outputs = generate_predict(model, tokenizer, task, prompts, batch_size=batch_size,
                                          max_new_tokens=max_new_tokens) if prompts else ([], [])
        for p, g, pr, o in list(zip(prompts, golds, preds, outputs))[:N_EXAMPLES_KEPT]:
            details.append({"prompt": p, "gold": g, "pred": pr, "output": o})
    result = {"task": task.name, "scorer": scorer}
    if scorer == "loglik":
        result["length_normalize"] = bool(length_normalize)
    result.update(classification_metrics(golds, preds, task.labels))
    result["excluded"] = excluded
    result["n_excluded"] = sum(excluded.values())
    result["examples"] = details
    return result


# ----------------------------------------------------------------------------------------------------
# CLI


def format_table(result: dict) -> str:
    labels = result["labels"]
    lines = [f"task {result['task']}  scorer {result['scorer']}  n {result['n']}  "
             f"excluded {result.get('n_excluded', 0)}  invalid {result['invalid']}",
             f"accuracy  {result['accuracy']:.4f}", f"macro-F1  {result['macro_f1']:.4f}", ""]
    width = max(12, max(len(l) for l in labels) + 2)
    lines.append(f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for label in labels:
        c = result["per_class"][label]
        lines.append(f"{label:<{width}}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}"
                     f"{c['support']:>10d}")
    lines += ["", "confusion matrix (rows gold, columns predicted)",
              " " * width + "".join(f"{l[:width - 1]:>{width}}" for l in labels)]
    for label, row in zip(labels, result["confusion_matrix"]):
        lines.append(f"{label:<{width}}" + "".join(f"{v:>{width}d}" for v in row))
    return "\n".join(lines)


def add_parser(eval_subparsers) -> argparse.ArgumentParser:
    """Register ``classify`` on an ``add_subparsers()`` object (``kdistill eval classify``)."""
    p = eval_subparsers.add_parser("classify", help="zero-shot classification: accuracy, macro-F1, confusion matrix")
    p.add_argument("--model", required=True, help="model folder (causal LM or seq2seq)")
    p.add_argument("--task", choices=["climate_fever", "hate_speech", "custom"], default="climate_fever")
    p.add_argument("--data", default=None, help="JSONL rows or a hub dataset id; default for climate_fever: "
                   f"{DEFAULT_DATA['climate_fever']}; hate_speech: {DEFAULT_DATA['hate_speech']}")
    p.add_argument("--split", default=None, help="split, when the data is a hub id (default: test)")
    p.add_argument("--scorer", choices=["loglik", "generate"], default="loglik")
    p.add_argument("--length-normalize", action="store_true",
                   help="loglik: mean log-prob per verbaliser token instead of the sum")
    p.add_argument("--all-labels", action="store_true", help="climate_fever: keep all four claim labels")
    p.add_argument("--labels", default=None, help="custom: comma-separated labels")
    p.add_argument("--template", default=None, help="custom: prompt template, str.format over the row "
                   "({labels} lists the choices)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=16, help="generate scorer")
    p.add_argument("--out", default=None, help="result JSON (default: classify_<task>.json)")
    p.add_argument("--max-invalid-fraction", type=float, default=0.5,
                   help="exit 1 when more than this fraction of answers is invalid (generate scorer)")
    p.set_defaults(eval_func=run_cli)
    return p


def run_cli(args) -> int:
    if args.task == "custom":
        if not args.labels or not args.data:
            print("error: --task custom needs --labels and --data", file=sys.stderr)
            return 2
        task = custom_task(args.labels, args.template, text_field=args.text_field, label_field=args.label_field)
    else:
        task = get_task(args.task, all_labels=args.all_labels)
    try:
        result = evaluate_classification(args.model, None, task, scorer=args.scorer, batch_size=args.batch_size,
                                         limit=args.limit, progress=True, data=args.data,
                                         length_normalize=getattr(args, "length_normalize", False),
                                         max_new_tokens=getattr(args, "max_new_tokens", 16),
                                         split=getattr(args, "split", None))
    except (UserError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["model"] = str(args.model)
    print(format_table(result))
    out = Path(args.out or f"classify_{task.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    if result["invalid"] > args.max_invalid_fraction * result["n"]:
        print(f"kdistill eval classify: error: {result['invalid']} of {result['n']} answers name no label "
              f"(more than --max-invalid-fraction {args.max_invalid_fraction}); the accuracy is not meaningful",
              file=sys.stderr)
        return 1
    return 0
