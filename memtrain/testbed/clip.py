"""A tiny CLIP trained contrastively on the testbed captions, as SD's text encoder was.

Its text tower becomes the diffusion model's frozen text encoder, so the eot embedding is a
trained, pooled summary of the prompt (paper 000's mechanism rests on that); its image tower
gives the testbed an image-text alignment score.
"""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

from memtrain.core.text import tokenize


def tiny_clip_config(hidden: int, layers: int, resolution: int, eos_token_id: int) -> CLIPConfig:
    """A small CLIPConfig for the testbed's contrastively trained CLIP."""
    text = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
        max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=eos_token_id - 1, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32), image_size=resolution,
        patch_size=max(2, resolution // 8), projection_dim=hidden,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=hidden)


def train_tiny_clip(
    images: torch.Tensor, prompts: list[str], tokenizer, hidden: int, layers: int,
    steps: int, batch_size: int, lr: float, seed: int, progress: bool = True,
) -> CLIPModel:
    """images (N, 3, H, W) in [-1, 1]; one caption per image. Returns the trained CLIPModel."""
    torch.manual_seed(seed)
    config = tiny_clip_config(hidden, layers, images.shape[-1], tokenizer.eos_token_id)
    model = CLIPModel(config)
    input_ids = tokenize(tokenizer, prompts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm

    model.train()
    for _ in tqdm(range(steps), desc="tiny CLIP", disable=not progress):
        idx = torch.randperm(len(prompts), generator=generator)[:batch_size]
        # Identical captions in one batch would be false negatives: keep the first of each.
        seen, keep = set(), []
        for i in idx.tolist():
            if prompts[i] not in seen:
                seen.add(prompts[i])
                keep.append(i)
        idx = torch.tensor(keep)
        ids = input_ids[idx]
        # Causal attention + eot pooling: positions after the longest eot never reach the loss
        # (as in CLIP's own training), so cutting them only saves time.
        length = int((ids == tokenizer.eos_token_id).float().argmax(dim=1).max()) + 1
        out = model(input_ids=ids[:, :length], pixel_values=images[idx], return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def text_tower(clip: CLIPModel) -> CLIPTextModel:
    """The CLIPModel's text transformer as a standalone CLIPTextModel (SD's text_encoder)."""
    text_model = CLIPTextModel(clip.config.text_config)
    prefix = "text_model."
    state = {k[len(prefix):]: v for k, v in clip.state_dict().items() if k.startswith(prefix)}
    missing, unexpected = text_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"text tower mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return text_model.eval().requires_grad_(False)
