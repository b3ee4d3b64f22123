"""Comparisons of distillation methods: one base config, variants x seeds, one evaluation, one report
(`kdistill compare`)."""

from kdistill.compare.run import evaluate_runs, generate_runs, run_compare, train_runs
from kdistill.compare.spec import CompareSpec, load_spec

__all__ = ["CompareSpec", "evaluate_runs", "generate_runs", "load_spec", "run_compare", "train_runs"]
