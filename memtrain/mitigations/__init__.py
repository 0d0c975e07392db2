"""Memorization mitigations behind one interface (see base.Mitigation).

Registered names: none, pad_eot, pad_mask (text-embedding path, paper 000), nemo, wanda
(U-Net weight pruning, paper 004 App. H), guidance_static, guidance_dynamic, guidance_opposite
(sampler, paper 003), overestimation_switch (sampler, paper 002 App. H), rta, rna (prompt
string, Somepalli et al. 2023), ren, ren_unmasked (cross-attention logits, Ren et al. 2024),
wen, wen_per_image (generation-time embedding optimization, Wen et al. 2024), edited_weights (another
model folder's U-Net: a removal method's output judged as a weight edit). `get_mitigation(name, **settings)` builds one.
"""

from memtrain.mitigations.base import (
    MITIGATIONS, THREAT_MODELS, Mitigation, NoMitigation, PruningMitigation, SearchSpaceAblation, applied, available_mitigations,
    get_mitigation, mitigation_class, register_mitigation, search_space_ablation,
)
from memtrain.mitigations.attention import Ren, RenUnmasked
from memtrain.mitigations.edited_weights import EditedWeights
from memtrain.mitigations.guidance import GuidanceDynamic, GuidanceOpposite, GuidanceStatic, OverestimationSwitch
from memtrain.metrics.signals import decomposition_delta, guidance_magnitude  # the signals they act on
from memtrain.mitigations.nemo import NeMo
from memtrain.mitigations.wen import Wen, WenPerImage
from memtrain.mitigations.random_insertion import RandomNumberAddition, RandomTokenAddition
from memtrain.mitigations.pad_eot import PadEot, PadMask
from memtrain.mitigations.wanda import Wanda

__all__ = [
    "MITIGATIONS", "THREAT_MODELS", "EditedWeights", "GuidanceDynamic", "GuidanceOpposite", "GuidanceStatic", "OverestimationSwitch",
    "RandomNumberAddition", "RandomTokenAddition", "Ren", "RenUnmasked", "Wen", "WenPerImage", "decomposition_delta", "guidance_magnitude",
    "Mitigation", "NoMitigation", "PruningMitigation", "PadEot", "PadMask", "NeMo", "Wanda",
    "SearchSpaceAblation", "applied", "available_mitigations", "get_mitigation", "mitigation_class", "register_mitigation",
    "search_space_ablation",
]
