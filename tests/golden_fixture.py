"""The golden-test fixture, rebuilt from its specification: a tiny SD v1-layout U-Net and CLIP
text encoder, SD v1.4's DDIM scheduler, four prompts and seeded latents, on which the official
code of Wen et al., Ren et al. (MemAttn), NeMo, torchmetrics' MS-SSIM and Somepalli et al.'s
RTA/RNA were run to produce tests/golden/official.json (source repositories and commits under
its `meta.official_code`; docs/fidelity.md lists them). Only numbers came over, no code.

Built on the CPU in float32 with one thread; the weights' sha256 is checked against the one the
official runs used, so a library version that initialises differently fails loudly here."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers

from memtrain.core.tokenizer import build_clip_tokenizer

OFFICIAL = json.loads((Path(__file__).parent / "golden" / "official.json").read_text())
FIXTURE = OFFICIAL["fixture"]
PROMPTS: list[str] = FIXTURE["prompts"]


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 over the sorted state dict: each key's utf-8 bytes, then the tensor as float32 bytes."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def latent(k: int, side: int = 16) -> torch.Tensor:
    """The fixture's latent k: (4, side, side) from a fresh generator seeded k."""
    return torch.randn((4, side, side), generator=torch.Generator().manual_seed(k))


def nemo_latents() -> torch.Tensor:
    """NeMo's official detection draw: 10 latents at 64 x 64 from seed 1, in one batch."""
    return torch.randn((10, 4, 64, 64), generator=torch.Generator().manual_seed(1))


@dataclass
class Golden:
    unet: diffusers.UNet2DConditionModel
    text_encoder: transformers.CLIPTextModel
    tokenizer: transformers.CLIPTokenizer
    scheduler: diffusers.DDIMScheduler

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """E(prompts): last_hidden_state of max_length-padded ids, (B, 77, 32)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]


@functools.lru_cache(maxsize=1)
def build(tokenizer_dir: str) -> Golden:
    """The fixture (weights checked against the official runs' sha256)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(FIXTURE["unet_seed"])
        unet = diffusers.UNet2DConditionModel(**FIXTURE["unet_config"]).eval().requires_grad_(False)
        torch.manual_seed(FIXTURE["text_seed"])
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**FIXTURE["text_config"]))
        text_encoder = text_encoder.eval().requires_grad_(False)
    finally:
        torch.set_num_threads(threads)
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        if state_sha256(module) != FIXTURE[f"{name}_sha256"]:
            raise AssertionError(f"golden fixture {name} does not rebuild bit-identically with diffusers "
                                 f"{diffusers.__version__} / transformers {transformers.__version__}")
    tokenizer = build_clip_tokenizer(Path(tokenizer_dir), pad_token="<|endoftext|>")
    scheduler = diffusers.DDIMScheduler(**FIXTURE["scheduler_config"])
    return Golden(unet, text_encoder, tokenizer, scheduler)
