"""Ren et al. 2024's inference-time mitigation: cross-attention logits rescaled so that attention
moves away from the prompt's trigger tokens.

What runs here (the reference code was not available offline; this follows papers 000 and 003's
descriptions and the published setting rescale_attention = 1.25): in every cross-attention layer
the logit of the beginning-of-text token is multiplied by `factor`. CLIP text encoders route most
attention to that token, so a larger factor draws attention from the prompt's own tokens. Since
logit_0 = scale * q . k_0, scaling k_0 (the key of position 0) by `factor` scales exactly that
logit, so the edit is a forward hook on each cross-attention `to_k`, whatever attention kernel
the model uses; the hooks live only for the duration of one U-Net call.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from memtrain.core.errors import MemtrainError
from memtrain.mitigations.base import Mitigation, register_mitigation


def cross_attention_keys(unet) -> dict[str, torch.nn.Module]:
    """The key projections of the U-Net's cross-attention layers (diffusers' `attn2.to_k`)."""
    keys = {name: m for name, m in unet.named_modules() if name.endswith("attn2.to_k")}
    if not keys:
        raise MemtrainError("ren: the U-Net has no cross-attention layers (attn2) to rescale")
    return keys


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
class Ren(Mitigation):
    """Cross-attention logit of the beginning token x `factor` (Ren et al. 2024, factor 1.25)."""

    name = "ren"
    changes = "U-Net forward pass: the cross-attention logit of the beginning-of-text token is multiplied by `factor`"
    inference_time = True

    factor: float = 1.25

    def __post_init__(self) -> None:
        if not float(self.factor) > 0:
            raise MemtrainError(f"ren: factor must be > 0, got {self.factor}")

    def unet_forward(self, bundle):
        unet = bundle.unet

        def forward(x, t, y):
            with rescaled_first_key(unet, float(self.factor)):
                return unet(x, t, encoder_hidden_states=y).sample

        return forward

    def details(self) -> dict:
        return {"rescaled": "the beginning-of-text token's logit in every cross-attention layer, both CFG branches",
                "source": "papers 000 and 003's description of Ren et al.; their code was not available offline"}
