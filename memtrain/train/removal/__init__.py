"""Removal baselines of paper 004 (Sec. 4.4, App. E.2, G.2) as trainings beside adversarial
fine-tuning: ESD (Gandikota et al. 2023), Concept Ablation (Kumari et al. 2023) and SISS (Alberti
et al. 2025), each writing a diffusers pipeline folder a publisher could release.

    from memtrain.train.removal import REMOVAL_METHODS, RemovalRecipe, RemovalRun, train_removal
"""

from memtrain.train.removal.recipe import (
    METHOD_DEFAULTS, ConceptAblationSpec, EsdSpec, RemovalRecipe, RemovalTrainSpec, SissSpec, load_removal_recipe,
    removal_recipe_from_dict,
)
from memtrain.train.removal.trainer import REMOVAL_METHODS, RemovalMethod, RemovalRun, train_removal
# registered in this order: esd, concept_ablation, siss
from memtrain.train.removal import esd  # noqa: E402,F401
from memtrain.train.removal import concept_ablation  # noqa: E402,F401
from memtrain.train.removal import siss  # noqa: E402,F401

__all__ = ["METHOD_DEFAULTS", "REMOVAL_METHODS", "ConceptAblationSpec", "EsdSpec", "RemovalMethod", "RemovalRecipe",
           "RemovalRun", "RemovalTrainSpec", "SissSpec", "load_removal_recipe", "removal_recipe_from_dict",
           "train_removal"]
