"""Prompts -> text embeddings (B, 77, D) with their token layout (sot | prompt | eot | pad).

Paper 000 acts on these four groups of positions separately, and so do the pad/eot
mitigations and the attack; the layout is derived from token ids, never from string tricks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class TokenLayout:
    """Boolean masks (B, L) over token positions; exactly one sot and one eot per row."""

    sot: torch.Tensor
    prompt: torch.Tensor
    eot: torch.Tensor
    pad: torch.Tensor

    @property
    def eot_index(self) -> torch.Tensor:
        return self.eot.float().argmax(dim=1)

    def to(self, device) -> "TokenLayout":
        return TokenLayout(*(m.to(device) for m in (self.sot, self.prompt, self.eot, self.pad)))


@dataclass
class TextEmbedding:
    """Text-encoder hidden states with the token ids and sot/prompt/eot/pad layout they came from."""

    embeddings: torch.Tensor  # (B, L, D): the text encoder's last hidden state
    input_ids: torch.Tensor  # (B, L)
    layout: TokenLayout

    def __len__(self) -> int:
        return self.embeddings.shape[0]


def token_layout(input_ids: torch.Tensor, eos_token_id: int) -> TokenLayout:
    """Positions: 0 is sot; eot is the first eos after it; everything after eot is padding.

    Position-based so that a tokenizer padding with `!` (id 0) or with eot (id 49407) gives
    the same layout.
    """
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    is_eos = (input_ids == eos_token_id) & (positions > 0)
    # the first eos per row; rows without one (cannot happen with truncation) end at L-1
    first_eos = torch.where(is_eos, positions, torch.full_like(positions, length - 1)).min(dim=1)
    eot_pos = first_eos.values.unsqueeze(1)
    sot = positions == 0
    eot = positions == eot_pos
    prompt = (positions > 0) & (positions < eot_pos)
    pad = positions > eot_pos
    return TokenLayout(sot=sot, prompt=prompt, eot=eot, pad=pad)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length, truncated (with a warning) as CLIP does."""
    max_length = tokenizer.model_max_length
    full = tokenizer(prompts, padding=False, truncation=False).input_ids
    for prompt, ids in zip(prompts, full):
        if len(ids) > max_length:
            logger.warning(
                "prompt truncated to %d tokens (had %d): %.60s...", max_length, len(ids), prompt
            )
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts(bundle, prompts: list[str] | str, tokenizer=None) -> TextEmbedding:
    """Encode prompts with the bundle's frozen text encoder; `tokenizer` overrides the bundle's
    (e.g. one that pads with `!`)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    tokenizer = tokenizer or bundle.tokenizer
    input_ids = tokenize(tokenizer, list(prompts)).to(bundle.text_encoder.device)
    embeddings = bundle.text_encoder(input_ids).last_hidden_state
    layout = token_layout(input_ids, tokenizer.eos_token_id)
    return TextEmbedding(embeddings=embeddings, input_ids=input_ids, layout=layout)
