"""`kdistill eval lm`: token-level KD diagnostics of students against their teacher on held-out text.

For every response token of held-out instruction rows (label != -100; causal models after the next-token
shift, T5 on the decoder side) this measures, teacher vs each student:

    kl               KL(P_teacher || P_student)   forward KL, nats per token
    reverse_kl       KL(P_student || P_teacher)
    top1_agreement   fraction of tokens where argmax P_student == argmax P_teacher
    perplexity       exp(mean token NLL of the reference token) for the student (and the teacher)
    entropy_gap      mean student entropy - mean teacher entropy (nats; > 0: the student is less peaked)

All means are token-weighted over the whole file: sums and token counts are accumulated over batches and
divided once at the end, so the batch size does not change the numbers. Both logit tensors are cut to the
shared tokenizer length (`kd_vocab_size`): rows of a padded embedding matrix past it are never real tokens.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kdistill.config import ModelConfig
from kdistill.data import DataCollatorForDistillation, encode_examples, load_examples
from kdistill.losses.divergences import forward_kl, reverse_kl
from kdistill.models import compare_tokenizers, kd_vocab_size, load_model, load_tokenizer
from kdistill.models.heads import align_positions

__all__ = ["lm_diagnostics", "add_parser", "run_cli", "format_table"]

IGNORE_INDEX = -100


def _is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _encode_data(data, tokenizer, max_length: int, limit: int | None, seq2seq: bool) -> list[dict]:
    """`data`: a path/hub id, a list of Examples, or already-encoded rows ({input_ids, labels})."""
    if isinstance(data, (str, Path)):
        examples = load_examples(str(data), limit=limit).examples
    else:
        examples = list(data)
        if limit is not None:
            examples = examples[:limit]
    if examples and isinstance(examples[0], dict) and "input_ids" in examples[0]:
        return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in examples]
    rows, _ = encode_examples(examples, tokenizer, max_length=max_length, is_encoder_decoder=seq2seq)
    return rows


def _logits_and_targets(model, batch: dict, vocab: int, seq2seq: bool):
    """(logits (N, V) float, targets (N,)) at the counted positions of one batch."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    if seq2seq:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits, targets = align_positions(out.logits, labels, seq2seq)
    mask = targets != IGNORE_INDEX
    return logits[..., :vocab][mask].float(), targets[mask]


def _entropy_sum(logits: torch.Tensor) -> float:
    logp = F.log_softmax(logits, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).sum())


def lm_diagnostics(teacher, students: dict, tokenizer, data, max_length: int = 256, batch_size: int = 8,
                   limit: int | None = None, progress: bool = True) -> dict:
    """Token-level diagnostics of each student against `teacher` on `data` (see the module docstring).

    `data`: a .jsonl/.json file (or hub id) of instruction rows, a list of `Example`s, or encoded rows with
    `input_ids`/`labels`. `students`: name -> model (same tokenizer as the teacher). Returns a JSON-ready dict
    with `teacher` (perplexity, nll, entropy) and `students` (name -> kl, reverse_kl, top1_agreement,
    perplexity, nll, entropy, entropy_gap), plus `examples`, `tokens` and `vocab_size`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not students:
        raise ValueError("pass at least one student")
    seq2seq = _is_seq2seq(teacher)
    for name, student in students.items():
        if _is_seq2seq(student) != seq2seq:
            raise ValueError(f"student {name!r} and the teacher are not both causal or both encoder-decoder")
    vocab = min(kd_vocab_size(tokenizer, teacher, s) for s in students.values())
    rows = _encode_data(data, tokenizer, max_length, limit, seq2seq)
    if not rows:
        raise ValueError("no example with a response token left after encoding")
    collate = DataCollatorForDistillation(pad_token_id=tokenizer.pad_token_id)

    models = [teacher, *students.values()]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    tokens = 0
    t_nll = t_ent = 0.0
    acc = {name: {"kl": 0.0, "reverse_kl": 0.0, "agree": 0, "nll": 0.0, "entropy": 0.0} for name in students}
    n_batches = -(-len(rows) // batch_size)
    try:
        with torch.inference_mode():
            for b, start in enumerate(range(0, len(rows), batch_size)):
                batch = collate(rows[start:start + batch_size])
                t_logits, targets = _logits_and_targets(teacher, batch, vocab, seq2seq)
                n = int(targets.numel())
                if n == 0:
                    continue
                tokens += n
                t_nll += float(F.cross_entropy(t_logits, targets, reduction="sum"))
                t_ent += _entropy_sum(t_logits)
                t_top = t_logits.argmax(-1)
                for name, student in students.items():
                    s_logits, s_targets = _logits_and_targets(student, batch, vocab, seq2seq)
                    if not torch.equal(s_targets.to(targets.device), targets):
                        raise RuntimeError("student and teacher targets differ; tokenisation mismatch")
                    s_logits = s_logits.to(t_logits.device)
                    a = acc[name]
                    a["kl"] += float(forward_kl(s_logits, t_logits, reduction="sum"))
                    a["reverse_kl"] += float(reverse_kl(s_logits, t_logits, reduction="sum"))
                    a["agree"] += int((s_logits.argmax(-1) == t_top).sum())
                    a["nll"] += float(F.cross_entropy(s_logits, targets, reduction="sum"))
                    a["entropy"] += _entropy_sum(s_logits)
                if progress:
                    print(f"\reval lm: batch {b + 1}/{n_batches}, {tokens} tokens", end="", file=sys.stderr,
                          flush=True)
    finally:
        for m, training in zip(models, was_training):
            m.train(training)
    if progress:
        print(file=sys.stderr)
    if tokens == 0:
        raise ValueError("no response tokens to evaluate")

    teacher_nll = t_nll / tokens
    teacher_entropy = t_ent / tokens
    result = {
        "kind": "lm",
        "examples": len(rows),
        "tokens": tokens,
        "vocab_size": vocab,
        "max_length": max_length,
        "teacher": {"perplexity": math.exp(teacher_nll), "nll": teacher_nll, "entropy": teacher_entropy},
        "students": {},
    }
    for name, a in acc.items():
        nll = a["nll"] / tokens
        entropy = a["entropy"] / tokens
        result["students"][name] = {
            "kl": a["kl"] / tokens,
            "reverse_kl": a["reverse_kl"] / tokens,
            "top1_agreement": a["agree"] / tokens,
            "perplexity": math.exp(nll),
            "nll": nll,
            "entropy": entropy,
            "entropy_gap": entropy - teacher_entropy,
        }
    return result


def format_table(result: dict) -> str:
    """Markdown table, teacher row first."""
    lines = ["| model | KL(t||s) | reverse KL | top-1 agreement | perplexity | entropy | entropy gap |",
             "|---|---|---|---|---|---|---|"]
    t = result["teacher"]
    lines.append(f"| teacher | - | - | - | {t['perplexity']:.3f} | {t['entropy']:.4f} | - |")
    for name, s in result["students"].items():
        lines.append(f"| {name} | {s['kl']:.4f} | {s['reverse_kl']:.4f} | {s['top1_agreement']:.4f} | "
                     f"{s['perplexity']:.3f} | {s['entropy']:.4f} | {s['entropy_gap']:+.4f} |")
    return "\n".join(lines)


def add_parser(eval_subparsers) -> None:
    """Register `lm` under `kdistill eval`."""
    p = eval_subparsers.add_parser("lm", help="Token-level KD diagnostics (KL, agreement, perplexity, entropy) "
                                              "of students against a teacher on held-out instruction data")
    p.add_argument("--teacher", required=True, help="Teacher model (hub id or folder); its tokenizer is used")
    p.add_argument("--student", action="append", required=True, metavar="NAME=PATH",
                   help="A student, NAME=PATH or a bare PATH (named after its folder); repeat for several")
    p.add_argument("--data", required=True, help="Held-out instruction rows (.jsonl/.json or hub id)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="First N examples only")
    p.add_argument("--out", default="eval_lm.json", help="Where to write the JSON results (default: eval_lm.json)")
    p.set_defaults(eval_func=run_cli)


def _parse_students(specs: list[str]) -> dict[str, str]:
    students: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or Path(spec).exists():
            path = spec
            name = Path(spec.rstrip("/")).name or spec
        base, i = name, 2
        while name in students:
            name, i = f"{base}-{i}", i + 1
        students[name] = path
    return students


def run_cli(args) -> int:
    teacher_cfg = ModelConfig(name_or_path=args.teacher)
    tokenizer = load_tokenizer(teacher_cfg)
    teacher = load_model(teacher_cfg, role="teacher")
    students = {}
    for name, path in _parse_students(args.student).items():
        cfg = ModelConfig(name_or_path=path)
        try:
            student_tok = load_tokenizer(cfg)
        except (OSError, ValueError):
            student_tok = None  # a folder without tokenizer files: assume the teacher's
        if student_tok is not None:
            compare_tokenizers(tokenizer, student_tok)
        students[name] = load_model(cfg)
    result = lm_diagnostics(teacher, students, tokenizer, args.data, max_length=args.max_length,
                            batch_size=args.batch_size, limit=args.limit)
    result["teacher"]["path"] = args.teacher
    result["data"] = str(args.data)
    print(f"{args.data}: {result['examples']} examples, {result['tokens']} response tokens")
    print(format_table(result))
    out = Path(args.out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")
    return 0
