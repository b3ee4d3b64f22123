"""Quickstart benchmark: runs `kdistill quickstart` at its defaults and prints the two ratios the README records.

Targets (issue #3): distilled student STS Spearman >= 97% of the teacher's, encode throughput >= 2x the
teacher's. Throughput is measured by the quickstart itself: teacher and students encode the evaluation sentences
in alternation, 3 rounds, median per model. Evaluation data: the 375 STS-B dev pairs kdistill ships (the
quickstart's default), or any pairs file / hub id given with --sts (e.g. a full copy of STS-B dev).

    .venv/bin/python benchmarks/quickstart.py [--out runs/quickstart-bench] [--sts FILE]

Not a test: timings on a shared 2-core machine are noisy; run it on an otherwise idle machine.
"""

import argparse

import torch

from kdistill.apps.quickstart import run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/quickstart-bench")
    parser.add_argument("--sts", default=None, help="evaluation pairs (default: the bundled STS-B dev subset)")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    result = run(out_dir=args.out, sts=args.sts)
    teacher, _, student = result["reports"]
    print(f"quickstart wall time: {result['seconds']:.0f} s")
    print(f"spearman: teacher {teacher['spearman']:.2f}, student {student['spearman']:.2f}, "
          f"ratio {100 * student['spearman'] / teacher['spearman']:.1f}% (target >= 97%)")
    print(f"throughput: teacher {teacher['sentences_per_second']:.0f}/s, student "
          f"{student['sentences_per_second']:.0f}/s, ratio "
          f"{student['sentences_per_second'] / teacher['sentences_per_second']:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
