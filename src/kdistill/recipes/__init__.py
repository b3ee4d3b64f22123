"""Recipes: one per kind of run (lm, step-by-step, embedding); each owns its datasets, collator, models, teacher
source, saving and after-training evaluation. `select_recipe` is the one place a config picks its recipe."""

from __future__ import annotations

from kdistill.config import RunConfig
from kdistill.recipes.base import DataReport, ListDataset, Parts, Recipe
from kdistill.recipes.embedding import EmbeddingRecipe
from kdistill.recipes.lm import LMRecipe
from kdistill.recipes.stepbystep import StepByStepRecipe

__all__ = ["DataReport", "ListDataset", "Parts", "Recipe", "select_recipe"]


def select_recipe(cfg: RunConfig) -> Recipe:
    """task: embedding -> the embedding recipe; a `stepbystep.dataset` -> step-by-step; otherwise the LM recipe."""
    if cfg.task == "embedding":
        return EmbeddingRecipe()
    if cfg.stepbystep.dataset:
        return StepByStepRecipe()
    return LMRecipe()
