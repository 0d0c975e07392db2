"""Paper 000 Sec. 4.2: inference-time mitigations on the <eot>/<pad> text embeddings.

`pad_eot`: SD1.x's CLIP tokenizer pads with <eot> (id 49407), so the padding repeats the
semantically dominant v_eot dozens of times. Padding with `!` (id 0 in CLIP's vocabulary, what
SD2.x's OpenCLIP does) decouples v_pad from v_eot; the single remaining v_eot is then replaced.
The paper's replacement symbol did not survive in our copy, so it is a setting: a zero vector
(default) or the embedding of a `!` pad position.

`pad_mask`: keep the tokenizer, zero a fraction (70%) of the v_pad embeddings.

Both act on the text-embedding path only; `transform_embeddings` works on any (B, L, D)
tensor given its token layout, so the attack can push an adversarial embedding through it.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from memtrain.core.errors import MemtrainError
from memtrain.mitigations.base import Mitigation, register_mitigation
from memtrain.core.text import TokenLayout

EOT_REPLACEMENTS = ("zero", "pad")
PAD_SELECTIONS = ("random", "first")


@register_mitigation
@dataclasses.dataclass(eq=False)
class PadEot(Mitigation):
    """Pad with '!' instead of <eot> and replace the <eot> embedding (paper 000 Sec. 4.2)."""

    name = "pad_eot"
    inference_time = True
    changes = ("text-embedding path: prompts are padded with '!' instead of <eot>, and the "
               "<eot> embedding is replaced (zero vector or a '!' pad embedding)")

    eot_replacement: str = "zero"  # "zero" | "pad" (the first '!' pad position of the row)
    pad_token: str = "!"

    _tokenizers: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.eot_replacement not in EOT_REPLACEMENTS:
            raise MemtrainError(
                f"pad_eot: eot_replacement '{self.eot_replacement}' is not one of "
                f"{', '.join(EOT_REPLACEMENTS)}"
            )

    def tokenizer(self, bundle):
        """A copy of the bundle's tokenizer that pads with `pad_token` (cached per tokenizer)."""
        base = bundle.tokenizer
        cached = self._tokenizers.get(id(base))
        if cached is not None and cached[0] is base:
            return cached[1]
        padded = copy.deepcopy(base)
        padded.pad_token = self.pad_token
        pad_id = padded.convert_tokens_to_ids(self.pad_token)
        if pad_id is None or pad_id == padded.unk_token_id and self.pad_token != padded.unk_token:
            raise MemtrainError(
                f"pad_eot: the tokenizer has no token '{self.pad_token}' to pad with"
            )
        self._tokenizers[id(base)] = (base, padded)
        return padded

    def transform_embeddings(self, embeddings: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        eot = layout.eot.to(embeddings.device).unsqueeze(-1).to(embeddings.dtype)  # (B, L, 1)
        if self.eot_replacement == "zero":
            return embeddings * (1 - eot)
        return embeddings * (1 - eot) + eot * _first_pad_embedding(embeddings, layout)

    def details(self) -> dict:
        what = ("a zero vector" if self.eot_replacement == "zero" else
                "the embedding of the first '!' pad position after it (zero when a prompt "
                "fills all positions)")
        return {"eot_replaced_by": what, "pad_token": self.pad_token}


def _first_pad_embedding(embeddings: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, 1, D): each row's embedding at position eot+1, zero where the row has no padding."""
    batch, length, _ = embeddings.shape
    device = embeddings.device
    index = (layout.eot_index.to(device) + 1).clamp(max=length - 1)
    rows = embeddings[torch.arange(batch, device=device), index]  # (B, D), differentiable
    has_pad = layout.pad.to(device).any(dim=1, keepdim=True).to(embeddings.dtype)
    return (rows * has_pad).unsqueeze(1)


@register_mitigation
@dataclasses.dataclass(eq=False)
class PadMask(Mitigation):
    """Zero a fraction of the <pad> embeddings (paper 000 Sec. 4.2)."""

    name = "pad_mask"
    inference_time = True
    changes = "text-embedding path: a fraction of the <pad> embeddings is set to zero vectors"

    fraction: float = 0.7
    which: str = "random"  # "random" (seeded subset) | "first" (the pads right after <eot>)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.fraction) <= 1.0:
            raise MemtrainError(f"pad_mask: fraction must be in [0, 1], got {self.fraction}")
        if self.which not in PAD_SELECTIONS:
            raise MemtrainError(
                f"pad_mask: which '{self.which}' is not one of {', '.join(PAD_SELECTIONS)}"
            )

    def masked_positions(self, layout: TokenLayout) -> torch.Tensor:
        """(B, L) bool: the pad positions this mitigation zeroes."""
        pad = layout.pad.cpu()
        masked = torch.zeros_like(pad)
        for row in range(pad.shape[0]):
            positions = pad[row].nonzero().flatten()
            count = round(float(self.fraction) * len(positions))
            masked[row, self._choose(positions, count)] = True
        return masked

    def _choose(self, positions: torch.Tensor, count: int) -> torch.Tensor:
        if self.which == "first":
            return positions[:count]
        # Seeded per row (not per batch) so a prompt's subset never depends on its batch mates.
        generator = torch.Generator().manual_seed(int(self.seed))
        return positions[torch.randperm(len(positions), generator=generator)[:count]]

    def transform_embeddings(self, embeddings: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        keep = (~self.masked_positions(layout)).to(device=embeddings.device,
                                                   dtype=embeddings.dtype)
        return embeddings * keep.unsqueeze(-1)

    def details(self) -> dict:
        if self.which == "first":
            how = (f"per prompt, the first round({self.fraction} * n_pad) pad positions after "
                   "<eot>")
        else:
            how = (f"per prompt, round({self.fraction} * n_pad) pad positions drawn by "
                   f"torch.randperm from a generator seeded with {self.seed} (fixed: the same "
                   "subset for every prompt with the same number of pads)")
        return {"masked_pads": how, "mask_value": "zero vector"}
