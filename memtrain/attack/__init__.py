"""The Dori attack (paper 004 Sec. 3.1): adversarial text embeddings against a frozen,
possibly mitigated U-Net; the prompt-space attacks (PEZ-style, GCG). Imports only the core layer."""

from memtrain.attack.dori import (INITS, AttackConfig, AttackResult, DoriAttack, UNetForward, attack,
                                  attack_loop, attacked_condition, cat_layouts, diffusion_loss,
                                  initial_embeddings, project_l2, resolve_forward, slice_layout)
from memtrain.attack.gcg import PROMPT_ATTACKS, GCGAttack, GCGSettings
from memtrain.attack.prompt_space import PromptAttack, word_token_ids

__all__ = [
    "INITS", "AttackConfig", "AttackResult", "DoriAttack", "UNetForward", "attack", "attack_loop",
    "attacked_condition", "cat_layouts", "diffusion_loss", "initial_embeddings", "project_l2",
    "resolve_forward", "slice_layout", "PromptAttack", "word_token_ids", "PROMPT_ATTACKS", "GCGAttack",
    "GCGSettings",
]
