"""Adversarial fine-tuning against memorization (paper 004 Sec. 4.4, Alg. 2, App. I)."""

from memtrain.train.recipe import Recipe, load_recipe, recipe_from_dict

__all__ = ["Recipe", "load_recipe", "recipe_from_dict"]
