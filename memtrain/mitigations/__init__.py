"""Memorization mitigations behind one interface (see base.Mitigation).

Registered names: none, pad_eot, pad_mask (text-embedding path, paper 000), nemo, wanda
(U-Net weight pruning, paper 004 App. H). `get_mitigation(name, **settings)` builds one.
"""

from memtrain.mitigations.base import (
    Mitigation, NoMitigation, PruningMitigation, SearchSpaceAblation, applied, available_mitigations,
    get_mitigation, mitigation_class, register_mitigation, search_space_ablation,
)
from memtrain.mitigations.nemo import NeMo
from memtrain.mitigations.pad_eot import PadEot, PadMask
from memtrain.mitigations.wanda import Wanda

__all__ = [
    "Mitigation", "NoMitigation", "PruningMitigation", "PadEot", "PadMask", "NeMo", "Wanda",
    "SearchSpaceAblation", "applied", "available_mitigations", "get_mitigation", "mitigation_class", "register_mitigation",
    "search_space_ablation",
]
