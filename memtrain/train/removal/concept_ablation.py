"""Concept Ablation (Kumari et al. 2023) of memorized images, in one U-Net for every memorized item
(paper 004 App. G.2).

Anchors: for each memorized item, anchor prompts (paraphrases from `anchor_file`, a JSON/YAML
mapping of item id or prompt -> prompts) whose images the original model generates
(`anchor_images` per item, spread over its prompts). As the authors' memorization filter does, an
image whose SSCD against the memorized image exceeds `image_threshold` is dropped, and so is every
image of a prompt whose images replicate more often than `max_replica_rate`. An item left without
an anchor image is skipped (reported, never trained, never called removed). Offline
(`anchors: surrogates`), the surrogate images memtrain.train.surrogates builds serve as anchor
images, with the memorized prompt as their prompt.

The loss, per row (an anchor image x with its anchor prompt c*, the memorized prompt c):
model-based, ||eps(x_t, c) - sg(eps(x_t, c*))||^2 with the trained U-Net's own prediction for c*
as the target; or noise-based, ||eps(x_t, c) - eps||^2; plus, with prior preservation, the anchor
prompt on its image toward its noise (the authors' --with_prior_preservation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memtrain.core import config
from memtrain.core.diffusion import regression_target, to_pixels
from memtrain.core.errors import MemtrainError
from memtrain.core.run import gather_in_order, shard
from memtrain.core.text import encode_prompts
from memtrain.train.removal.data import generate_scored, load_image_file, safe_name
from memtrain.train.removal.trainer import REMOVAL_METHODS, Job, RemovalMethod
from memtrain.train.surrogates import build_surrogates, descriptor_for

GROUPS = {"cross-attn": ("attn2.to_k", "attn2.to_v"), "attn": ("to_q", "to_k", "to_v", "to_out")}


def ablation_weights(unet, group: str) -> list[str]:
    """The U-Net parameter names a parameter group trains (the authors' cross-attn, attn, full-weight)."""
    names = [n for n, _ in unet.named_parameters()]
    return names if group == "full-weight" else [n for n in names if any(k in n for k in GROUPS[group])]


def read_anchor_file(path: str) -> dict[str, list[str]]:
    """{item id or prompt: [anchor prompts]} from a JSON/YAML file; a bad shape is one line."""
    data = config.read_yaml(path)  # JSON is YAML
    if not all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in data.values()):
        raise MemtrainError(f"concept_ablation.anchor_file '{path}': every value must be a list of anchor prompts")
    return {str(k): [p.strip() for p in v if p.strip()] for k, v in data.items()}


@REMOVAL_METHODS.register
class ConceptAblation(RemovalMethod):
    """Concept Ablation toward filtered anchor images."""

    name = "concept_ablation"

    def trainable(self, unet) -> list[str]:
        return ablation_weights(unet, self.spec.parameter_group)

    @property
    def prior(self) -> bool:
        # surrogates: the anchor prompt is the memorized prompt, so there is no anchor prompt to preserve
        return self.spec.prior_preservation and self.spec.anchors == "paraphrases"

    def rows(self) -> int:
        return self.t.train.batch * (2 if self.prior else 1)

    def learning_rate(self, lr: float) -> float:
        """--scale_lr: x batch x processes x accumulation, x 2 with prior preservation."""
        t = self.t.train
        if not self.spec.scale_lr:
            return lr
        return lr * t.batch * self.t.world * t.gradient_accumulation_steps * (2 if self.prior else 1)

    # anchors -------------------------------------------------------------------------------------
    def prepare(self):
        t, spec = self.t, self.spec
        if spec.anchors == "surrogates":
            per_item = self._surrogate_anchors()
        else:
            per_item = self._paraphrase_anchors()
        examples, skipped, found = [], {}, {}
        for i, item in enumerate(t.items):
            kept, info = per_item[i]
            found[item.id] = info
            if kept:
                examples += [(i, prompt, path) for prompt, path in kept]
            else:
                skipped[item.id] = info["why"]
        items = sorted({i for i, _, _ in examples})
        jobs = [Job("all", items, t.out, t.out / "checkpoints", data=examples)] if items else []
        return jobs, skipped, found

    def _surrogate_anchors(self) -> list:
        t, spec = self.t, self.spec
        if spec.loss == "model-based":
            raise MemtrainError("concept_ablation.loss model-based needs paraphrased anchor prompts (with anchors: "
                                "surrogates the anchor prompt is the memorized one): set concept_ablation.loss=noise "
                                "or anchors=paraphrases")
        try:
            kept = build_surrogates(t.bundle, spec.surrogates, t.items, t.out / "anchors", model_name=t.recipe.model,
                                    dtype=t.frozen_dtype, accelerator=t.acc)
        except MemtrainError as err:
            if not str(err).startswith("no usable surrogates"):
                raise
            kept = []
        out = []
        for item in t.items:
            mine = [(item.prompt, s.image) for s in kept if s.extra["memorized_id"] == item.id]
            why = f"no surrogate image with SSCD <= {spec.surrogates.sscd_drop_threshold} against every memorized image"
            out.append((mine, {"anchor_images": len(mine), "why": why if not mine else None}))
        return out

    def _paraphrase_anchors(self) -> list:
        t, spec = self.t, self.spec
        mapping = read_anchor_file(spec.anchor_file) if spec.anchor_file else {}
        descriptor = descriptor_for(t.recipe.descriptor, t.acc.device)
        settings = t.bundle.sampler_settings.with_overrides(spec.sampler)

        def one(i: int, item) -> tuple[list, dict]:
            prompts = mapping.get(item.id) or mapping.get(item.prompt) or []
            if not prompts:
                where = f"in {spec.anchor_file}" if spec.anchor_file else "(no concept_ablation.anchor_file given)"
                return [], {"anchor_prompts": 0, "why": f"no anchor prompt {where}"}
            kept, rates = [], {}
            for j, prompt in enumerate(prompts):
                n = len(range(j, spec.anchor_images, len(prompts)))  # round robin over the prompts
                if n == 0:
                    continue
                seeds = [t.recipe.seed + 1000 + k for k in range(n)]
                made = generate_scored(t.bundle, descriptor, item, prompt, seeds, settings,
                                       t.out / "anchors" / safe_name(item.id) / f"prompt{j}")
                rates[prompt] = sum(g.sscd > spec.image_threshold for g in made) / len(made)
                if rates[prompt] <= spec.max_replica_rate:
                    kept += [(prompt, g.path) for g in made if g.sscd <= spec.image_threshold]
            why = None if kept else (f"no valid anchor: every image of its {len(prompts)} anchor prompt(s) has SSCD > "
                                     f"{spec.image_threshold} or its prompt replicates in > {spec.max_replica_rate:.0%}")
            return kept, {"anchor_prompts": len(prompts), "replica_rate": rates, "anchor_images": len(kept), "why": why}

        return gather_in_order([(i, one(i, item)) for i, item in shard(t.items, t.acc)], t.acc)

    # training ------------------------------------------------------------------------------------
    def start_job(self, job: Job) -> None:
        t = self.t
        anchors = sorted({prompt for _, prompt, _ in job.data})
        self.anchor_index = {p: k for k, p in enumerate(anchors)}
        with torch.no_grad():
            self.memorized = encode_prompts(t.bundle, [m.prompt for m in t.items]).embeddings
            self.anchor = encode_prompts(t.bundle, anchors).embeddings

    def loss(self, job: Job, g: torch.Generator):
        t, spec, n = self.t, self.spec, self.t.train.batch
        dev, T = t.acc.device, t.scheduler.config.num_train_timesteps
        picks = [job.data[k] for k in torch.randint(0, len(job.data), (n,), generator=g).tolist()]
        pixels = to_pixels([load_image_file(path) for _, _, path in picks], t.bundle.pixel_resolution)
        with torch.no_grad():
            x0 = t.bundle.encode_images(pixels).float().cpu()
        rows = 2 * n if self.prior else n
        x0 = torch.cat([x0, x0]) if self.prior else x0
        noise = torch.randn(x0.shape, generator=g)
        tt = torch.randint(0, T, (rows,), generator=g)
        x_t = t.scheduler.add_noise(x0, noise, tt).to(dev, t.unet_dtype)
        y_mem = self.memorized[[i for i, _, _ in picks]]
        y_anchor = self.anchor[[self.anchor_index[p] for _, p, _ in picks]]
        y = torch.cat([y_mem, y_anchor]) if self.prior else y_mem
        tt = tt.to(dev)
        pred = t.model(x_t, tt, encoder_hidden_states=y.to(dev, t.unet_dtype)).sample.float()
        target = regression_target(t.scheduler, x0, noise, tt.cpu()).to(dev)
        if spec.loss == "model-based":
            with torch.no_grad(), t.acc.autocast():
                anchor_pred = t.unwrapped(x_t[:n], tt[:n], encoder_hidden_states=y_anchor.to(dev, t.unet_dtype)).sample
            loss = F.mse_loss(pred[:n], anchor_pred.float())
        else:
            loss = F.mse_loss(pred[:n], target[:n])
        logs = {"loss/ablation": float(loss.detach())}
        if self.prior:
            prior = F.mse_loss(pred[n:], target[n:])
            loss = loss + spec.prior_loss_weight * prior
            logs["loss/prior"] = float(prior.detach())
        return loss, logs

