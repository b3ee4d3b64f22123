"""`kdistill <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import json
import logging
import sys


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


def _tiny_parser(sub) -> None:
    p = sub.add_parser("tiny", help="Write a tiny offline teacher/student pair (for trying kdistill without a hub).",
                       description="Train a tokenizer on a local text/JSONL file and write a small randomly "
                                   "initialised teacher and a smaller student that share it.")
    p.add_argument("--out", required=True, help="Folder to write teacher/ and student/ into")
    p.add_argument("--kind", choices=("causal", "t5"), default="causal")
    p.add_argument("--data", required=True, help="Local .jsonl/.json/.txt file to train the tokenizer on")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--teacher-steps", type=int, default=0,
                   help="Fine-tune the teacher on --data with cross-entropy for this many steps first")
    p.add_argument("--seed", type=int, default=0)


def cmd_train(args) -> int:
    from kdistill.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from kdistill.pipeline import prepare

        prepared = prepare(cfg)
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        for report in prepared.data:
            print(f"{report.source}: {report.examples} examples, {len(report.skipped_invalid)} skipped invalid, "
                  f"{report.truncated} truncated, {report.dropped_no_target} dropped (no response left)")
        return 0
    from kdistill.pipeline import run_training

    summary = run_training(cfg, resume=not args.no_resume)
    final = {k: v for k, v in summary.items() if k != "log_history"}
    print(json.dumps(final, indent=2, default=str))
    return 0


def cmd_tiny(args) -> int:
    from kdistill.tiny import make_tiny_pair

    paths = make_tiny_pair(args.out, kind=args.kind, data=args.data, vocab_size=args.vocab_size,
                           teacher_steps=args.teacher_steps, seed=args.seed)
    print(json.dumps(paths, indent=2))
    return 0


COMMANDS = {"train": cmd_train, "tiny": cmd_tiny}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdistill", description="Distil large language models into small ones.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _tiny_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kdistill.config import ConfigError
    from kdistill.data import DataValidationError
    from kdistill.models import VocabularyMismatchError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataValidationError, VocabularyMismatchError, FileNotFoundError) as exc:
        print(f"kdistill {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
