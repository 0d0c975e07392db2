"""The model bundle: one object for any diffusers Stable-Diffusion-style checkpoint.

Loads SD1.x/SD2.x folders in diffusers layout (unet, text_encoder, tokenizer, vae, scheduler).
The autoencoder is looked up by its config's class name in the CODECS registry: AutoencoderKL is
built in, the testbed's pixel codec is a lazy entry (a "module:attribute" string imported by
importlib on first lookup, so this layer never imports what sits above it and a testbed folder
loads without importing memtrain.testbed first), and other codecs register with `register_codec`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel, CLIPTokenizer

from memtrain.core.errors import MemtrainError
from memtrain.core.fingerprint import fingerprint
from memtrain.core.registry import Registry
from memtrain.core.runtime import DTYPE_NAMES, Runtime, run_in_chunks
from memtrain.core.sampling import SamplerSettings

log = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
    # SD v1's own default (ConceptPrune's pipelines run it): PLMS steps only, as SD's config has it
    "pndm": PNDMScheduler,
}
_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
CODECS = Registry("autoencoder class", canonical=str)
CODECS.add("AutoencoderKL", AutoencoderKL)
CODECS.lazy("PixelShuffleCodec", "memtrain.testbed.codec:PixelShuffleCodec")
# Images per autoencoder call when no memory plan set them (ModelBundle.batch_limits): a
# manifest never goes through the VAE in one call.
DEFAULT_VAE_BATCH = 16


def register_codec(cls: type) -> type:
    """Make an autoencoder class loadable by name from a model folder's vae/config.json.

    The class needs diffusers' from_pretrained/save_pretrained, `encode_images(pixels)` and
    `decode_latents(latents)`, and a `factor` in its config (pixels per latent cell)."""
    return CODECS.add(cls.__name__, cls)


def codec_class(name: str | None) -> type | None:
    """The registered autoencoder class of that config `_class_name` (None if unknown)."""
    return CODECS.get(name)


@dataclass
class ModelDefaults:
    """What a model folder brings besides its weights, filled in by whoever made the model (the
    testbed's resolver) and empty for a plain checkpoint: default manifests by role (memorized,
    held_out, unique, utility), CLIP weights for A_CLIP, an audit recipe, a display name."""

    model_dir: str
    manifests: dict[str, str] = field(default_factory=dict)
    clip_model: str | None = None
    audit_recipe: str | None = None
    label: str | None = None

    def manifest(self, role: str) -> str | None:
        return self.manifests.get(role)

    @classmethod
    def plain(cls, model: str | None) -> "ModelDefaults":
        """A checkpoint that brings nothing but its weights; None is a one-line error."""
        if model is None:
            raise MemtrainError("no --model given: pass a diffusers Stable Diffusion folder")
        return cls(model_dir=str(model))


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers warns on every module .to() that "modules that should be kept in float32: []":
    an empty list, nothing for the user to act on, so its logger is quieted inside."""
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


@dataclass
class ModelBundle:
    """One Stable-Diffusion-style model: U-Net, text encoder, tokenizer, autoencoder (or a
    registered codec), scheduler."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    vae: torch.nn.Module
    scheduler: object
    source: str = ""  # what the user named (path or hub id)
    path: str = ""  # the local folder it was loaded from
    # images per VAE call by stage (vae_encode, vae_decode), from the command's memory plan
    batch_limits: dict = field(default_factory=dict)
    runtime: Runtime | None = None  # records the batch sizes used, when a command set one

    @property
    def sampler_settings(self) -> SamplerSettings:
        """The model folder's default sampler (memtrain.json), else the papers' DDIM 50 / 7.5."""
        return SamplerSettings.for_model(self.path or None)

    @property
    def pixel_resolution(self) -> int:
        """The image side the latents decode to (SD: 8 x sample_size; other codecs: their factor)."""
        factor = getattr(self.vae.config, "factor", None)
        if factor is None:  # AutoencoderKL: one downsampling per block after the first
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.sample_size * factor)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def sample_size(self) -> int:
        return self.unet.config.sample_size

    @property
    def embedding_dim(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        with quiet_diffusers():
            for module in (self.unet, self.text_encoder, self.vae):
                module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "ModelBundle":
        for module in (self.unet, self.text_encoder, self.vae):
            module.eval().requires_grad_(False)
        return self

    def make_scheduler(self, name: str = "ddim"):
        """A fresh scheduler of the named kind built from this checkpoint's scheduler config."""
        key = name.lower()
        if key not in SCHEDULERS:
            raise MemtrainError(
                f"unknown scheduler '{name}': choose one of {', '.join(sorted(SCHEDULERS))}"
            )
        extra = {}
        if key == "pndm" and "skip_prk_steps" not in self.scheduler.config:
            # a checkpoint saved with another scheduler: SD's PNDM setting, not diffusers' default
            extra["skip_prk_steps"] = True
        return SCHEDULERS[key].from_config(self.scheduler.config, **extra)

    def _chunked(self, stage: str, inputs: torch.Tensor, fn) -> torch.Tensor:
        batch = self.batch_limits.get(stage, DEFAULT_VAE_BATCH)
        parts = run_in_chunks(len(inputs), batch, lambda a, b: fn(inputs[a:b]), stage, self.runtime)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> latents the U-Net is trained on, in chunks of the
        plan's `vae_encode` batch."""
        return self._chunked("vae_encode", images, self._encode)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(device=self.vae.device, dtype=self.vae.dtype)
        if isinstance(self.vae, AutoencoderKL):
            latents = self.vae.encode(images).latent_dist.mean
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            return (latents - shift) * self.vae.config.scaling_factor
        return self.vae.encode_images(images)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], in chunks of the plan's `vae_decode` batch."""
        return self._chunked("vae_decode", latents, self._decode)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        if isinstance(self.vae, AutoencoderKL):
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            return self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample
        return self.vae.decode_latents(latents)

    def save(self, path: str | Path) -> None:
        """Save in diffusers layout (safetensors), loadable by load_bundle and diffusers."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(str(path / "tokenizer"))
        self.vae.save_pretrained(path / "vae", safe_serialization=True)
        self.scheduler.save_pretrained(path / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "vae": ["diffusers" if isinstance(self.vae, AutoencoderKL) else "memtrain",
                    type(self.vae).__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        (path / "model_index.json").write_text(json.dumps(index, indent=2))


def resolve_model_path(model: str | Path) -> Path:
    """A local diffusers folder as is; a hub id via the hub cache or a download."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise MemtrainError(
                f"model path '{model}' is not a diffusers Stable Diffusion folder "
                "(no model_index.json): point --model at the folder that holds unet/, vae/, ..."
            )
        return path
    if str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise MemtrainError(f"model path '{model}' does not exist: pass an existing diffusers folder")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.txt", "*.safetensors", "tokenizer/*"]
        return Path(snapshot_download(str(model), allow_patterns=patterns))
    except Exception as err:  # no network, unknown repo, gated repo...
        raise MemtrainError(
            f"could not fetch hub model '{model}' ({type(err).__name__}): download it on a "
            "machine with network access and pass --model /path/to/local/folder"
        ) from None


def load_bundle(
    model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ModelBundle:
    """Load any diffusers SD1.x/SD2.x checkpoint (or the testbed) into a ModelBundle."""
    path = resolve_model_path(model)
    for sub in _SUBFOLDERS:
        if not (path / sub).is_dir():
            raise MemtrainError(
                f"model folder '{path}' lacks the '{sub}/' subfolder: a Stable Diffusion "
                f"checkpoint in diffusers layout needs {', '.join(_SUBFOLDERS)}"
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    vae_class_name = json.loads((path / "vae" / "config.json").read_text()).get("_class_name")
    if vae_class_name not in CODECS:
        raise MemtrainError(f"model folder '{path}': vae class '{vae_class_name}' is not supported "
                            f"(registered: {', '.join(CODECS)}; others register with register_codec)")
    vae = CODECS[vae_class_name].from_pretrained(path / "vae", torch_dtype=dtype)
    scheduler_config = dict(DDIMScheduler.load_config(path / "scheduler"))
    # DDIM/DDPM default to clipping x0 to [-1, 1], a pixel-space setting: latents are not clipped
    # in any SD release, so a config that does not say (a PNDM config) means no clipping
    scheduler_config.setdefault("clip_sample", False)
    scheduler = DDIMScheduler.from_config(scheduler_config)
    bundle = ModelBundle(unet, text_encoder, tokenizer, vae, scheduler, source=str(model), path=str(path))
    bundle.to(device=device).eval()
    log.info("loaded %s on %s in %s", model, bundle.device, DTYPE_NAMES.get(bundle.dtype, bundle.dtype))
    return bundle


def load_for_runtime(model: str | Path, runtime: Runtime, lora: str | Path | None = None) -> ModelBundle:
    """load_bundle on the runtime's device in its dtype, with `lora` (U-Net LoRA weights, every
    command's --lora) fused in; the bundle records its batch sizes there."""
    bundle = load_bundle(model, device=runtime.device, dtype=runtime.dtype)
    bundle.runtime = runtime
    if lora:
        fuse_lora_weights(bundle, lora)
    return bundle


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # StableDiffusionPipeline.save_lora_weights' name


def fuse_lora_weights(bundle: ModelBundle, lora: str | Path) -> None:
    """Fuse U-Net LoRA weights (adv_finetune's output with `finetune: lora`) into the bundle, so
    the U-Net is a plain one again: mitigations, the attack and checksums see ordinary weights."""
    path = Path(lora)
    weights = path / LORA_WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise MemtrainError(f"LoRA weights '{lora}' not found: give the folder holding {LORA_WEIGHTS} "
                            "(output_dir/model of an adv_finetune run with finetune: lora)")
    bundle.unet.load_lora_adapter(str(weights.parent), weight_name=weights.name, prefix="unet")
    bundle.unet.fuse_lora()
    bundle.unet.unload_lora()


def weights_checksum(bundle: ModelBundle) -> str:
    """Digest of every parameter and buffer of U-Net, text encoder and VAE, bit for bit: equal
    before a mitigation and after its undo, or the undo was not exact. Reduced on the weights'
    device (memtrain.core.fingerprint): only a few int64 per tensor come to the host."""
    return fingerprint((f"{part}.{name}", tensor) for part in ("unet", "text_encoder", "vae")
                       for name, tensor in getattr(bundle, part).state_dict().items())
