"""Cross-tokenizer distillation, measured: CE alone vs CE + `crosstok` (uld, gold, alm) with one budget, a teacher and
a student whose tokenizers differ, scored on held-out text with tokenizer-independent figures. Offline, on models
trained here.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cross_tokenizer.py --reference  # the README's table (~23 min)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cross_tokenizer.py              # without the reference (~18 min)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cross_tokenizer.py --small      # a quick pass (~2.5 min)

Steps (each resumable: a finished one is kept when the command is rerun with the same settings):

1. **Data** (OUT/data): the split of `benchmarks/quality.py` (`prepare_data`): the teacher trains on Alpaca rows
   0-1,799 of `examples/data/alpaca_2000.jsonl`, students on the first `student_rows` of them; rows 1,800-1,999 are
   held out.
2. **Two tokenizers, trained here on the same text** (the teacher's 1,800 rows): the teacher's is a Unigram model with
   SentencePiece-style `▁` spaces (`tokenizers`' Unigram + Metaspace, 4,096 pieces; the alphabet is the training
   text's characters, so a held-out row with a character it never saw becomes `<unk>` and is skipped as
   unalignable), as LLaMA's; the student's kdistill's byte-level BPE with `Ġ` spaces (1,024 tokens), as Qwen's.
   Both use the ChatML template. `--teacher-tokenizer bpe` gives the teacher a byte-level BPE of 4,096 instead (the
   same algorithm, a larger vocabulary).
3. **Models** (`kdistill.apps.tiny.decoder_config`): a Llama-style teacher pre-trained with CE by `kdistill train`
   on the 1,800 rows, and a smaller random Qwen2-style student (see MODEL_TYPE for why the types differ).
4. **Variants** (`kdistill train`), identical steps, batch, learning rate, schedule, seed and rows: `ce` (CE alone,
   weight 1) and, with the teacher, CE 0.5 + `crosstok` 0.5 for `uld`, `gold` (forward KL on the matched
   vocabulary; GOLD's default weights, and the matched part alone) and `alm` (forward binary KL, tau 100, the
   default); plus `alm` with tau 1, `alm` with tau 100 and weight 50 (ALM's loss is about 1/tau the size of a
   log-prob gap, see below), and `alm` alone. With `--reference`, also a teacher of the same size, data and steps on
   the STUDENT's tokenizer (measured on the student's tokens), and a student trained with CE 0.5 + `kd` 0.5 (forward
   KL) from it: what same-tokenizer KD gains in this setting.
5. **Measurement** (here): every held-out row is encoded in both tokenisations with
   `kdistill.data.cross_rows.encode_cross` (the training encoding, `max_length` 128 on each side; rows that do not
   align are skipped and counted). Its chunks c (runs of student tokens and of teacher tokens that spell the same
   characters of the reference answer; a chunk cut by `max_length` on either side is dropped on both) are the
   evaluated text, the same for every model. From one forward pass per model (its own tokens, teacher forcing):
   * log p_M(c) = the sum over c's tokens of log p_M(token | everything before it), natural log;
   * **bits per character** = sum_c -log p_M(c) / ln 2 / N_chars, where N_chars = the number of characters of the
     evaluated text (the student's tokens of each chunk decoded as-is and counted; the teacher's tokens spell the
     same characters up to whitespace at chunk edges). Tokenizer-independent, so the teacher gets one too;
   * **chunk |Δ|** = mean over chunks of |log p_t(c) - log p_s(c)| (nats);
   * **chunk KL** = mean over chunks of KL(Bern(p_t(c)) || Bern(p_s(c))) with p = exp(log p(c)), i.e.
     `kdistill.losses.cross_tokenizer.alm_loss` at binarization_temperature 1 (its 1e-6 shift included): how far
     the student's probability of each chunk of text is from the teacher's, 0 iff equal (nats);
   with bootstrap standard errors over held-out rows (2,000 resamples) and paired ones for the difference to `ce`.
   Seconds per optimizer step come from each run's `train_runtime`.

Why the extra alm rows: per chunk, ALM's binarised forward KL with chunk probabilities exp(log p / tau) is, for a
large tau, about (1/tau) * (a log(a/b) - a + b) with a = -log p_t(c), b = -log p_s(c): a divergence between the two
NLLs scaled by 1/tau, so at tau 100 beside CE (whose gradient is about 1 per token) it is ~1% of the signal. Its
gradient in b is (1/tau) (1 - a/b): on the reference text it pushes a chunk's NLL down where the student is worse
than the teacher and UP where it is better, a per-chunk reweighting of CE (it sees no alternative tokens).

Prints a Markdown table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from on_policy import SUMMARY, timing, train  # noqa: E402
from quality import MAX_LENGTH, prepare_data  # noqa: E402

from kdistill.apps.tiny import CHATML_TEMPLATE, build_model, decoder_config, iter_text, train_tokenizer  # noqa: E402
from kdistill.config import ModelConfig  # noqa: E402
from kdistill.data import load_examples  # noqa: E402
from kdistill.data.alignment import matched_vocabulary  # noqa: E402
from kdistill.data.cross_rows import CHUNK_KEYS, TEACHER_VIEW, CrossTokenizerCollator, encode_cross  # noqa: E402
from kdistill.losses.cross_tokenizer import alm_loss  # noqa: E402
from kdistill.losses.policy import target_logprobs  # noqa: E402
from kdistill.models import load_model, load_tokenizer  # noqa: E402

SIZES = {  # (default, --small)
    "teacher": ({"hidden": 128, "layers": 4, "heads": 4, "steps": 600, "batch": 16},
                {"hidden": 96, "layers": 2, "heads": 4, "steps": 100, "batch": 16}),
    "student": ({"hidden": 48, "layers": 2, "heads": 4}, {"hidden": 32, "layers": 2, "heads": 4}),
    "student_rows": (800, 160),
    "steps": (300, 30),
    "batch": (16, 8),
    "eval_limit": (None, 48),
}
VOCAB = {"teacher": 4096, "student": 1024}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# transformers 5 loads a tokenizer by the model's type: in a qwen2 folder it becomes a Qwen2Tokenizer, which keeps
# the vocabulary but replaces the pre-tokenizer with Qwen2's (a Unigram model then splits into single characters);
# in a llama folder the tokenizer.json is used as written. So the teacher is Llama-style, the student Qwen2-style.
MODEL_TYPE = {"teacher": "llama", "student": "qwen2"}
LR = 3.0e-3
SEED = 0
BASELINE = "ce"


def crosstok(method: str, weight: float = 0.5, **options) -> dict:
    return {"ce": {"weight": 0.5}, "x": {"type": "crosstok", "method": method, "weight": weight, **options}}


VARIANTS = {  # name -> (objectives, label)
    "ce": ({"ce": {"weight": 1.0}}, "CE alone"),
    "uld": (crosstok("uld"), "CE 0.5 + uld 0.5"),
    "gold": (crosstok("gold", divergence="forward_kl"), "CE 0.5 + gold 0.5 (forward KL, GOLD's weights)"),
    "gold_matched": (crosstok("gold", divergence="forward_kl", matched_weight=1.0, unmatched_weight=0.0),
                     "CE 0.5 + gold 0.5 (forward KL on the matched vocabulary only)"),
    "alm": (crosstok("alm", divergence="forward_kl"), "CE 0.5 + alm 0.5 (tau 100)"),
    "alm_tau1": (crosstok("alm", divergence="forward_kl", binarization_temperature=1.0), "CE 0.5 + alm 0.5 (tau 1)"),
    "alm_w50": (crosstok("alm", weight=50.0, divergence="forward_kl"), "CE 0.5 + alm 50 (tau 100)"),
    "alm_only": ({"x": {"type": "crosstok", "method": "alm", "weight": 1.0, "divergence": "forward_kl"}},
                 "alm 1 alone (tau 100, no CE)"),
}


REFERENCE = {  # --reference: a teacher with the student's own tokenizer (same size, data and steps as the other)
    "same_teacher": (None, "same-tokenizer teacher (reference)"),
    "kd_same": ({"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "divergence": "forward_kl"}},
                "CE 0.5 + kd 0.5 (forward KL) from the same-tokenizer teacher"),
}


def config_of(name: str) -> dict:
    return VARIANTS[name][0] if name in VARIANTS else REFERENCE[name][0]


# ------------------------------------------------------------------------------------------------ models
def teacher_tokenizer(texts: list[str], kind: str):
    """The teacher's tokenizer: a Unigram with `▁` spaces (SentencePiece-style), or a larger byte-level BPE."""
    if kind == "bpe":
        return train_tokenizer(texts, vocab_size=VOCAB["teacher"])
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted({ch for text in texts for ch in text if ch != " "})  # a space is `▁`
    tok.train_from_iterator(texts, trainer=trainers.UnigramTrainer(
        vocab_size=VOCAB["teacher"], special_tokens=[*SPECIALS, "<unk>"], unk_token="<unk>",
        initial_alphabet=alphabet, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=SPECIALS[1:])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_models(out: Path, teacher_data: Path, small: bool, kind: str) -> dict[str, Path]:
    """Random teacher and student folders (model + tokenizer) under OUT/models, unless built with these settings."""
    folder, t, s = out / "models", SIZES["teacher"][small], SIZES["student"][small]
    settings = {"teacher_tokenizer": kind, "model_type": MODEL_TYPE, "vocab": VOCAB, "teacher": t, "student": s,
                "seed": SEED, "data": str(teacher_data), "same_tokenizer_teacher": True}
    record = folder / "models.json"
    paths = {role: folder / f"{role}-init" for role in ("teacher", "student", "same")}
    if record.is_file() and json.loads(record.read_text())["settings"] == settings:
        print(f"{folder}: teacher and student exist, kept")
        return paths
    texts = list(iter_text(teacher_data))
    tokenizers = {"teacher": teacher_tokenizer(texts, kind), "student": train_tokenizer(texts, VOCAB["student"])}
    info = {"settings": settings}
    tokenizers["same"] = tokenizers["student"]  # --reference: the teacher's size with the student's tokenizer
    for role, seed in (("teacher", SEED), ("student", SEED + 1), ("same", SEED)):
        size, tok = (t, s)[role == "student"], tokenizers[role]
        model = build_model(decoder_config(tok, hidden_size=size["hidden"], num_layers=size["layers"],
                                           num_heads=size["heads"], model_type=MODEL_TYPE.get(role, "qwen2")),
                            seed=seed)
        model.save_pretrained(paths[role])
        tok.save_pretrained(paths[role])
        info[role] = {"params": sum(p.numel() for p in model.parameters()), "vocab": len(tok), **size}
    s_ids, _ = matched_vocabulary(tokenizers["student"], tokenizers["teacher"])
    info["matched_vocabulary"] = int(s_ids.numel())
    record.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return paths


def base_config(student: Path, rows: Path, steps: int, batch: int) -> dict:
    return {
        "student": {"name_or_path": str(student)},
        "data": {"train": str(rows), "max_length": MAX_LENGTH, "skip_invalid": True},
        "training": {"max_steps": steps, "per_device_train_batch_size": batch, "learning_rate": LR,
                     "lr_scheduler_type": "cosine", "warmup_steps": max(1, steps // 10), "logging_steps": 10,
                     "save_strategy": "no", "disable_tqdm": True, "report_to": []},
        "seed": SEED,
    }


# ----------------------------------------------------------------------------------------------- measurement
def heldout(path: Path, s_tok, t_tok, limit: int | None) -> tuple[list[dict], list[str], list[int]]:
    """Held-out rows in both tokenisations (the skipped ones' reasons), and each row's evaluated characters."""
    loaded = load_examples(str(path), limit=limit, skip_invalid=True)
    rows, _, skipped = encode_cross(loaded.examples, s_tok, t_tok, max_length=MAX_LENGTH, skip_invalid=True)
    chars = []
    for row in rows:
        by_chunk: dict[int, list[int]] = {}
        for token, c in zip(row["input_ids"], row[CHUNK_KEYS[0]]):
            if c >= 0:
                by_chunk.setdefault(c, []).append(token)
        chars.append(sum(len(s_tok.decode(ids, clean_up_tokenization_spaces=False)) for ids in by_chunk.values()))
    return rows, skipped, chars


@torch.no_grad()
def chunk_logprobs(model, batch: dict, prefix: str, chunk_key: str, vocab: int) -> list[torch.Tensor]:
    """Per row, (C,) log p(chunk) under `model` reading the view `prefix` (its tokens; teacher forcing)."""
    ids = batch[f"{prefix}input_ids"]
    logits = model(input_ids=ids, attention_mask=batch[f"{prefix}attention_mask"]).logits[..., :vocab]
    lp = target_logprobs(logits[:, :-1], ids[:, 1:])  # entry i: log p(token i + 1 | tokens <= i)
    chunks = batch[chunk_key][:, 1:]
    out = []
    for b in range(ids.shape[0]):
        keep = chunks[b] >= 0
        width = int(chunks[b][keep].max()) + 1 if keep.any() else 0
        out.append(torch.zeros(width, dtype=torch.float64).index_add(0, chunks[b][keep], lp[b][keep].double()))
    return out


def per_row(teacher_lp: list[torch.Tensor], model_lp: list[torch.Tensor], chars: list[int]) -> dict:
    """Per-row sums: chunks, characters, NLL in bits, |Δ log p| and the binary KL (tau 1) to the teacher."""
    sums = {k: [] for k in ("chunks", "chars", "nll_bits", "abs_gap", "chunk_kl")}
    for t, s, n in zip(teacher_lp, model_lp, chars):
        if t.shape != s.shape:
            raise RuntimeError(f"a held-out row has {t.numel()} teacher chunks and {s.numel()} student chunks")
        sums["chunks"].append(float(t.numel()))
        sums["chars"].append(float(n))
        sums["nll_bits"].append(float(-s.sum() / math.log(2)))
        sums["abs_gap"].append(float((t - s).abs().sum()))
        sums["chunk_kl"].append(float(alm_loss(s, t, binarization_temperature=1.0, reduction="sum")))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in sums.items()}


RATIOS = {"bits_per_char": ("nll_bits", "chars"), "chunk_abs_gap": ("abs_gap", "chunks"),
          "chunk_kl": ("chunk_kl", "chunks")}


def figures(rows: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None, resamples: int = 2000) -> dict:
    """Ratio-of-sums figures with bootstrap standard errors over rows (paired difference to `base`)."""
    g = torch.Generator().manual_seed(SEED)
    n = len(rows["chars"])
    idx = torch.randint(0, n, (resamples, n), generator=g)
    out = {}
    for name, (num, den) in RATIOS.items():
        value = float(rows[num].sum() / rows[den].sum())
        boot = rows[num][idx].sum(-1) / rows[den][idx].sum(-1)
        out[name], out[f"{name}_se"] = value, float(boot.std())
        if base is not None:
            diff = boot - base[num][idx].sum(-1) / base[den][idx].sum(-1)
            out[f"{name}_minus_{BASELINE}"] = value - float(base[num].sum() / base[den].sum())
            out[f"{name}_minus_{BASELINE}_se"] = float(diff.std())
    return out


def measure(folders: dict[str, Path], teacher_dir: Path, data: Path, limit: int | None) -> dict:
    s_tok = load_tokenizer(ModelConfig(name_or_path=str(folders[BASELINE])))
    t_tok = load_tokenizer(ModelConfig(name_or_path=str(teacher_dir)))
    rows, skipped, chars = heldout(data, s_tok, t_tok, limit)
    collate = CrossTokenizerCollator(student_pad_id=s_tok.pad_token_id, teacher_pad_id=t_tok.pad_token_id)
    batches = [collate(rows[i:i + 16]) for i in range(0, len(rows), 16)]
    teacher = load_model(ModelConfig(name_or_path=str(teacher_dir)), role="teacher").eval()
    t_lp = [lp for b in batches for lp in chunk_logprobs(teacher, b, f"{TEACHER_VIEW}_", CHUNK_KEYS[1], len(t_tok))]
    one_to_one = tokens = 0
    for row in rows:  # the share of the student's evaluated tokens in chunks of one token on both sides
        s_count: dict[int, int] = {}
        t_count: dict[int, int] = {}
        for key, count in ((CHUNK_KEYS[0], s_count), (CHUNK_KEYS[1], t_count)):
            for c in row[key]:
                if c >= 0:
                    count[c] = count.get(c, 0) + 1
        tokens += sum(s_count.values())
        one_to_one += sum(1 for c, k in s_count.items() if k == 1 and t_count[c] == 1)
    per_model = {"teacher": per_row(t_lp, t_lp, chars)}
    for name, folder in folders.items():
        model = load_model(ModelConfig(name_or_path=str(folder))).eval()
        s_lp = [lp for b in batches for lp in chunk_logprobs(model, b, "", CHUNK_KEYS[0], len(s_tok))]
        per_model[name] = per_row(t_lp, s_lp, chars)
        del model
    results = {name: figures(r, None if name in ("teacher", BASELINE) else per_model[BASELINE])
               for name, r in per_model.items()}
    first = per_model["teacher"]
    return {"models": results, "rows": len(rows), "skipped": skipped, "chunks": int(first["chunks"].sum()),
            "chars": int(first["chars"].sum()), "student_tokens": tokens,
            "teacher_tokens": sum(sum(1 for c in r[CHUNK_KEYS[1]] if c >= 0) for r in rows),
            "one_to_one_token_share": one_to_one / max(tokens, 1)}


# ---------------------------------------------------------------------------------------------------- report
def cell(f: dict, key: str, diff: bool = False, digits: int = 3) -> str:
    if diff:
        name = f"{key}_minus_{BASELINE}"
        return f"{f[name]:+.{digits}f} ± {f[name + '_se']:.{digits}f}" if name in f else "-"
    return f"{f[key]:.{digits}f} ± {f[key + '_se']:.{digits}f}"


def table(results: dict) -> str:
    head = ["model", "bits / char (held-out)", f"minus {BASELINE}'s (paired)", "chunk KL to teacher",
            f"minus {BASELINE}'s (paired)", "chunk \\|Δ log p\\|", "s / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["models"].items():
        f, tm = r["figures"], r.get("timing")
        is_teacher = name == "teacher"
        cells = [r["label"], cell(f, "bits_per_char"), cell(f, "bits_per_char", True),
                 "0 (itself)" if is_teacher else cell(f, "chunk_kl", digits=4),
                 "-" if is_teacher else cell(f, "chunk_kl", True, 4),
                 "0 (itself)" if is_teacher else cell(f, "chunk_abs_gap"),
                 f"{tm['seconds_per_step']:.2f}" if tm else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/bench-cross-tokenizer", help="Work folder (default: %(default)s)")
    p.add_argument("--small", action="store_true", help="Small sizes: a quick pass, not the README's figures")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps per variant (default 300; --small 30)")
    p.add_argument("--teacher-tokenizer", choices=("unigram", "bpe"), default="unigram",
                   help="The teacher's tokenizer: Unigram with ▁ spaces (default) or a byte-level BPE of 4,096")
    p.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset (default: all)")
    p.add_argument("--reference", action="store_true",
                   help="Also train a teacher of the same size on the student's tokenizer and a student with CE 0.5 "
                        "+ kd 0.5 (forward KL) from it: what same-tokenizer KD gains here (about 6 min more)")
    args = p.parse_args()
    hf_logging.disable_progress_bar()
    start, small, out = time.perf_counter(), args.small, Path(args.out)
    steps, batch = args.steps or SIZES["steps"][small], SIZES["batch"][small]
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or BASELINE not in names:
        p.error(f"--variants: unknown {unknown}" if unknown else f"--variants must include {BASELINE}")

    data = prepare_data(out, SIZES["student_rows"][small], [])
    init = build_models(out, data["teacher"], small, args.teacher_tokenizer)
    t = SIZES["teacher"][small]
    teacher_cfg = base_config(init["teacher"], data["teacher"], t["steps"], t["batch"])
    teacher_cfg["objectives"] = {"ce": {"weight": 1.0}}
    teacher_dir = train(out, "teacher", teacher_cfg, out / "models" / "models.json")
    folders, teachers = {}, {name: teacher_dir for name in names if name != "ce"}
    if args.reference:
        same_cfg = {**teacher_cfg, "student": {"name_or_path": str(init["same"])}}
        folders["same_teacher"] = teachers["kd_same"] = train(out, "same_teacher", same_cfg,
                                                              out / "models" / "models.json")
        names.append("kd_same")
    for name in names:
        config = base_config(init["student"], data["student"], steps, batch)
        config["objectives"] = config_of(name)
        if name in teachers:
            config["teacher"] = {"name_or_path": str(teachers[name])}
        folders[name] = train(out, name, config, teachers.get(name, teacher_dir) / SUMMARY)

    print(f"measuring {len(folders) + 1} models on the held-out rows", flush=True)
    measured = measure(folders, teacher_dir, data["heldout_alpaca"], SIZES["eval_limit"][small])
    labels = {"teacher": "teacher (reference)", **{k: v[1] for k, v in {**VARIANTS, **REFERENCE}.items()}}
    models = {}
    for name, f in measured.pop("models").items():
        models[name] = {"label": labels[name], "figures": f}
        if name in ("teacher", "same_teacher"):
            models[name]["timing"] = None
            models[name]["train_seconds"] = timing(folders.get(name, teacher_dir), t["steps"])["train_seconds"]
        else:
            models[name]["timing"] = timing(folders[name], steps)
            models[name]["objectives"] = config_of(name)
    results = {"settings": {"small": small, "steps": steps, "batch": batch, "lr": LR, "seed": SEED,
                            "student_rows": SIZES["student_rows"][small], "max_length": MAX_LENGTH,
                            "teacher_tokenizer": args.teacher_tokenizer, "reference": args.reference,
                            "threads": torch.get_num_threads(),
                            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
               "models_built": json.loads((out / "models" / "models.json").read_text()),
               "heldout": measured, "models": models}
    results["wall_seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    h = measured
    print(f"\nheld-out: {h['rows']} rows ({len(h['skipped'])} skipped as unalignable), {h['chunks']} chunks, "
          f"{h['chars']} characters, {h['student_tokens']} student / {h['teacher_tokens']} teacher tokens, "
          f"{h['one_to_one_token_share']:.0%} of the student's tokens in one-to-one chunks; matched vocabulary "
          f"{results['models_built']['matched_vocabulary']} tokens\n")
    print(table(results))
    print(f"\nresults: {out / 'results.json'}")
    print(f"total wall time: {results['wall_seconds']:.0f} s (this invocation; finished steps are kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
