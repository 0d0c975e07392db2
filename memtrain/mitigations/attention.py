"""Ren et al. 2024 ("Unveiling and Mitigating Memorization in Text-to-image Diffusion Models
through Cross Attention", code: renjie3/MemAttn): cross-attention edits that pull attention away
from a prompt's trigger tokens, and the attention-entropy probe their detector reads.

`ren` is the official operation (MemAttn's refactored attention processor): in every
cross-attention layer the logits q.k^T / sqrt(head_dim) get -inf at key positions >= the
prompt's length L (start and end tokens counted, so the padding after the end token) in both
classifier-free-guidance branches, then the beginning token's logit is multiplied by `factor`
(c1) in the conditional branch only, then the softmax. Masked padding matters most: on SD-shaped
models most of the prompt's influence flows through the padding positions.

`ren_unmasked` is what memtrain ran before: the beginning token's key scaled in both branches
(equal to scaling its logit), nothing masked.

Both run as a swapped attention processor on the U-Net's `attn2` modules for the duration of one
U-Net call, so they stay differentiable for the attack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import ClassVar

import torch

from memtrain.core.errors import MemtrainError
from memtrain.core.text import TextEmbedding
from memtrain.mitigations.base import Mitigation, register_mitigation


def cross_attention_modules(unet) -> dict[str, torch.nn.Module]:
    """The U-Net's cross-attention modules (diffusers' `attn2`), in registration order."""
    modules = {name: m for name, m in unet.named_modules() if name.endswith("attn2") and hasattr(m, "processor")}
    if not modules:
        raise MemtrainError("ren: the U-Net has no cross-attention layers (attn2) to edit")
    return modules


def cross_attention_keys(unet) -> dict[str, torch.nn.Module]:
    """The key projections of the U-Net's cross-attention layers (diffusers' `attn2.to_k`)."""
    keys = {name: m for name, m in unet.named_modules() if name.endswith("attn2.to_k")}
    if not keys:
        raise MemtrainError("ren: the U-Net has no cross-attention layers (attn2) to rescale")
    return keys


class ExplicitCrossAttention:
    """An attention processor that forms the probabilities explicitly, so they can be edited
    (MemAttn's operation) or recorded (the entropy probe).

    `factor`: multiplies the position-0 logit of the rows in `scaled_rows` (B,) bool;
    `lengths` (B,) long or None: keys at positions >= lengths[b] get -inf; `record`: a list that
    receives each call's probabilities of the rows in `scaled_rows`, mean over heads and queries
    (B', S), in call (= forward) order."""

    def __init__(self, factor: float = 1.0, scaled_rows: torch.Tensor | None = None,
                 lengths: torch.Tensor | None = None, record: list | None = None):
        self.factor, self.scaled_rows, self.lengths, self.record = factor, scaled_rows, lengths, record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        logits = query @ key.transpose(-2, -1) * (attn.scale if attn.scale is not None else 1 / math.sqrt(head_dim))
        if attention_mask is not None:
            logits = logits + attn.prepare_attention_mask(attention_mask, key.shape[2], batch).view(
                batch, attn.heads, -1, key.shape[2])
        if self.lengths is not None:
            positions = torch.arange(key.shape[2], device=logits.device)
            masked = positions[None, :] >= self.lengths.to(logits.device)[:, None]  # (B, S)
            logits = logits.masked_fill(masked[:, None, None, :], float("-inf"))
        rows = self.scaled_rows.to(logits.device) if self.scaled_rows is not None else None
        if rows is not None and self.factor != 1.0:
            scale = torch.ones(batch, 1, 1, key.shape[2], device=logits.device, dtype=logits.dtype)
            scale[rows, :, :, 0] = self.factor
            logits = logits * scale  # out of place: differentiable for the attack
        probs = logits.softmax(dim=-1)
        if self.record is not None:
            self.record.append((probs[rows] if rows is not None else probs).mean(dim=(1, 2)).detach())
        hidden_states = (probs @ value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def explicit_cross_attention(unet, processor: ExplicitCrossAttention):
    """Within the block every cross-attention layer runs `processor`; the old ones come back."""
    modules = cross_attention_modules(unet)
    saved = {name: m.processor for name, m in modules.items()}
    for m in modules.values():
        m.processor = processor
    try:
        yield
    finally:
        for name, m in modules.items():
            m.processor = saved[name]


@torch.no_grad()
def cross_attention_probabilities(unet, x: torch.Tensor, t, cond: torch.Tensor) -> list[torch.Tensor]:
    """Plain U-Net call on (x, t, cond); per cross-attention layer in forward order, the attention
    probabilities over the text positions, mean over heads and queries: (B, S) each."""
    record: list[torch.Tensor] = []
    rows = torch.ones(x.shape[0], dtype=torch.bool)
    with explicit_cross_attention(unet, ExplicitCrossAttention(1.0, rows, None, record)):
        unet(x, t, encoder_hidden_states=cond)
    return record


def _fingerprint(row: torch.Tensor) -> int:
    return hash(row.detach().float().cpu().numpy().tobytes())


@register_mitigation
@dataclasses.dataclass(eq=False)
class Ren(Mitigation):
    """MemAttn's inference-time mitigation: padding keys masked in both branches, the beginning
    token's logit x `factor` in the conditional branch (Ren et al. 2024: c1 1.25, mask on)."""

    name = "ren"
    variant: ClassVar[str] = "official (MemAttn: conditional-branch c1 + padding mask)"
    changes = ("U-Net forward pass: cross-attention keys after the prompt's end token masked (both CFG branches), "
               "the beginning-of-text logit x `factor` (conditional branch)")
    inference_time = True

    factor: float = 1.25
    mask: bool = True  # MemAttn's --cross_attn_mask (the published command sets it)
    mask_end: bool = False  # MemAttn's --mask_length_minis1: the end token masked too

    _lengths: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not float(self.factor) > 0:
            raise MemtrainError(f"ren: factor must be > 0, got {self.factor}")

    def encode(self, bundle, prompts) -> TextEmbedding:
        """As the base class, and each conditioning row's prompt length is remembered: the mask
        needs it, and the U-Net call only sees embeddings."""
        encoded = super().encode(bundle, prompts)
        rows = encoded.embeddings.to(bundle.device, bundle.dtype)
        for row, eot in zip(rows, encoded.layout.eot_index.tolist()):
            self._lengths[_fingerprint(row)] = int(eot) + 1
        return encoded

    def lengths_of(self, cond: torch.Tensor) -> torch.Tensor:
        """(B,) the mask length per conditioning row: its prompt length L (L - 1 with mask_end).
        A row that did not come from `encode` (an adversarial or raw embedding) has no prompt
        length, so nothing is masked for it, as for a prompt filling all positions."""
        full = cond.shape[1]
        lengths = [self._lengths.get(_fingerprint(row), full + int(self.mask_end)) for row in cond]
        return torch.tensor(lengths, dtype=torch.long) - int(self.mask_end)

    def _forward(self, bundle, conditional_only: bool):
        unet = bundle.unet

        def forward(x, t, y):
            batch = y.shape[0]
            if conditional_only:  # the attack's single-branch call: every row is a conditional one
                rows, cond = torch.ones(batch, dtype=torch.bool), y
            else:  # the sampler's cat([uncond, cond]); both halves get the conditional row's mask
                rows = torch.arange(batch) >= batch // 2
                cond = y[batch // 2:]
            lengths = None
            if self.mask:
                lengths = self.lengths_of(cond)
                lengths = lengths if conditional_only else torch.cat([lengths, lengths])
            with explicit_cross_attention(unet, ExplicitCrossAttention(float(self.factor), rows, lengths)):
                return unet(x, t, encoder_hidden_states=y).sample

        return forward

    def unet_forward(self, bundle):
        return self._forward(bundle, conditional_only=False)

    def attack_forward(self, bundle):
        return self._forward(bundle, conditional_only=True)

    def details(self) -> dict:
        return {"rescaled": "the beginning-of-text token's logit in every cross-attention layer, conditional branch",
                "masked": ("keys at positions >= the prompt length " + ("- 1 (end token too)" if self.mask_end else
                           "(padding after the end token)") + ", both branches") if self.mask else "nothing",
                "source": "renjie3/MemAttn@c66efd2 refactored_attention_processor.py"}


@contextlib.contextmanager
def rescaled_first_key(unet, factor: float):
    """Within the block, every cross-attention key at text position 0 is multiplied by `factor`."""
    def hook(module, args, output):
        scale = torch.ones(output.shape[1], 1, device=output.device, dtype=output.dtype)
        scale[0] = factor
        return output * scale  # out of place: differentiable for the attack

    handles = [m.register_forward_hook(hook) for m in cross_attention_keys(unet).values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@register_mitigation
@dataclasses.dataclass(eq=False)
class RenUnmasked(Mitigation):
    """memtrain's earlier reading of Ren et al.: the beginning token's key x `factor` in both CFG
    branches (logit_0 = scale * q . k_0, so that scales the logit), no padding mask."""

    name = "ren_unmasked"
    variant: ClassVar[str] = "memtrain before 2026-12: both branches, no mask"
    changes = "U-Net forward pass: the cross-attention logit of the beginning-of-text token is multiplied by `factor`"
    inference_time = True

    factor: float = 1.25

    def __post_init__(self) -> None:
        if not float(self.factor) > 0:
            raise MemtrainError(f"ren_unmasked: factor must be > 0, got {self.factor}")

    def unet_forward(self, bundle):
        unet = bundle.unet

        def forward(x, t, y):
            with rescaled_first_key(unet, float(self.factor)):
                return unet(x, t, encoder_hidden_states=y).sample

        return forward

    def details(self) -> dict:
        return {"rescaled": "the beginning-of-text token's logit in every cross-attention layer, both CFG branches",
                "source": "papers 000 and 003's description of Ren et al."}
