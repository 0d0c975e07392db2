"""`locality` (paper 004 Sec. 4, App. J): is the memorization of one image local?

For one memorized target, `n_embeddings` adversarial embeddings Y_adv are optimized by Dori from
random starts N(0, I) (optionally also from non-memorized prompts, App. J.1). Then:
- replication: SSCD_Orig of generations from each y_adv against the target image;
- input space: t-SNE of starts and optimized embeddings; pairwise L2 within each set and from
  each start to its optimum (Fig. 3, Fig. 11);
- activations: MeanDiscrepancy (Eq. 6) per layer at the first denoising step with fixed noise,
  in the cross-attention value layers (attn2.to_v, NeMo's) and the feed-forward layers (the
  input of ff.net.2, Wanda's), for Y_adv against Y_mem, the prompts of the different memorized
  images (Fig. 4). We average over the N(N-1) ordered pairs i != j; Eq. 6 as printed divides by
  (N-1)^2, which only rescales by N/(N-1);
- weights: MeanAgreement (Eq. 7, IoU; 1 when both selections are empty) of NeMo's and Wanda's
  selections per layer, across Y_adv and across Y_mem (Fig. 5).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from memtrain.attack import AttackConfig, DoriAttack
from memtrain.core.errors import MemtrainError
from memtrain.core.report import MarkdownReport
from memtrain.core.sampling import initial_noise, sample
from memtrain.core.text import encode_prompts
from memtrain.eval.analyses.inputs import AnalysisInputs, pyplot, save_figure
from memtrain.eval.measure import embed_generations
from memtrain.metrics import sscd_orig
from memtrain.mitigations import get_mitigation
from memtrain.mitigations.nemo import value_layers
from memtrain.mitigations.wanda import ffn_output_layers


@dataclass
class LocalitySettings:
    """recipe `locality:` (paper 004: 100 embeddings, 50 steps at lr 0.1)."""

    target: int = 0  # index of the memorized image in the manifest
    n_embeddings: int = 100
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(init="random"))
    from_non_memorized: bool = False  # also optimize from non-memorized prompts (App. J.1)
    replication_seeds: int = 2  # generations per adversarial embedding for its SSCD_Orig
    selections: list[str] = field(default_factory=lambda: ["nemo", "wanda"])
    nemo: dict = field(default_factory=dict)  # NeMo settings (as in an audit recipe)
    wanda: dict = field(default_factory=dict)
    reference_prompts: int = 64  # non-memorized prompts for NeMo's statistics

    def __post_init__(self) -> None:
        if self.n_embeddings < 2:
            raise MemtrainError(f"locality: n_embeddings must be >= 2, got {self.n_embeddings}")
        for name in self.selections:
            if name not in ("nemo", "wanda"):
                raise MemtrainError(f"locality: selections are 'nemo' and/or 'wanda', got '{name}'")


def mean_pairwise(matrix: np.ndarray) -> float:
    """Mean of a square matrix over its off-diagonal entries (Eq. 6 / Eq. 7 over i != j)."""
    n = matrix.shape[0]
    return float((matrix.sum() - np.trace(matrix)) / (n * (n - 1)))


def iou(a: set, b: set) -> float:
    """Eq. 7's Agreement: |a & b| / |a | b|, 1 when both are empty."""
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def mean_agreement(selections: list[dict[str, set]], layers: list[str]) -> dict[str, float]:
    """Per layer, the mean IoU over pairs of selections (Eq. 7)."""
    out = {}
    for layer in layers:
        sets = [s.get(layer, set()) for s in selections]
        pairs = [iou(a, b) for a, b in itertools.combinations(sets, 2)]
        out[layer] = float(np.mean(pairs)) if pairs else 1.0
    return out


@contextlib.contextmanager
def recorded_activations(unet, store: dict):
    """Record, per call, attn2.to_v outputs and ff.net.2 inputs into store[name] (lists)."""
    handles = []
    for name in value_layers(unet, "all"):
        module = dict(unet.named_modules())[name]
        handles.append(module.register_forward_hook(
            lambda m, a, out, name=name: store.setdefault(name, []).append(out.detach().half().cpu())))
    for name, module in ffn_output_layers(unet).items():
        handles.append(module.register_forward_pre_hook(
            lambda m, a, name=name: store.setdefault(name, []).append(a[0].detach().half().cpu())))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def first_step_activations(bundle, embeddings: torch.Tensor, seed: int = 0, batch: int = 8) -> dict[str, torch.Tensor]:
    """Per layer (N, ...) activations of one U-Net call at the first sampling step, same noise for all."""
    scheduler = bundle.make_scheduler(bundle.sampler_settings.scheduler)
    scheduler.set_timesteps(bundle.sampler_settings.num_inference_steps)
    t = scheduler.timesteps[0]
    shape = (bundle.latent_channels, bundle.sample_size, bundle.sample_size)
    x = (initial_noise(seed, shape) * scheduler.init_noise_sigma).to(bundle.device, bundle.dtype)
    store: dict = {}
    with recorded_activations(bundle.unet, store):
        for start in range(0, len(embeddings), batch):
            y = embeddings[start:start + batch].to(bundle.device, bundle.dtype)
            x_in = scheduler.scale_model_input(x.expand(len(y), -1, -1, -1), t)
            bundle.unet(x_in, t, encoder_hidden_states=y)
    return {name: torch.cat(chunks) for name, chunks in store.items()}


def mean_discrepancy(activations: torch.Tensor) -> float:
    """Eq. 6: mean squared L2 distance between the activations of every two inputs."""
    flat = activations.flatten(1).float()
    return mean_pairwise((torch.cdist(flat, flat) ** 2).numpy())


def pairwise_l2(x: torch.Tensor) -> np.ndarray:
    flat = x.flatten(1).float()
    d = torch.cdist(flat, flat).numpy()
    return d[np.triu_indices(len(d), 1)]


def _optimize(inputs: AnalysisInputs, settings: LocalitySettings, target_latent, prompt, init, other=None):
    n = settings.n_embeddings
    config = AttackConfig(**{**settings.attack.__dict__, "init": init, "other_prompt": other})
    attack = DoriAttack(inputs.bundle, target_latent.expand(n, -1, -1, -1), [prompt] * n, config)
    starts = attack.y.detach().float().cpu().clone()
    return starts, attack.run().embeddings


def _selections(inputs, settings, name: str, embeddings: torch.Tensor) -> list[dict[str, set]]:
    bundle = inputs.bundle
    method = get_mitigation(name, **getattr(settings, name))
    reference = inputs.prompts("non_memorized")[: settings.reference_prompts]
    seeds = inputs.seeds
    if name == "nemo":
        method.prepare(bundle, [], reference, seeds)
        return [{k: set(v) for k, v in method.localize_embedding(bundle, e[None], seeds).items()} for e in embeddings]
    return [{k: set(v.tolist()) for k, v in method.select_for_embedding(bundle, e[None], seeds).items()}
            for e in embeddings]


def run(inputs: AnalysisInputs, settings: LocalitySettings, out: Path) -> tuple[dict, MarkdownReport]:
    bundle = inputs.bundle
    memorized = inputs.items["memorized"]
    if not 0 <= settings.target < len(memorized):
        raise MemtrainError(f"locality: target {settings.target} is not an index into the {len(memorized)} memorized items")
    if inputs.latents("memorized") is None:
        raise MemtrainError("locality needs the memorized images (the manifest's image paths) to attack")
    target = memorized[settings.target]
    latent = inputs.latents("memorized")[settings.target: settings.target + 1]
    sets = {"random": _optimize(inputs, settings, latent, target.prompt, "random")}
    if settings.from_non_memorized and inputs.items["non_memorized"]:
        other = inputs.prompts("non_memorized")[0]
        sets["non_memorized_prompt"] = _optimize(inputs, settings, latent, target.prompt, "other_prompt", other)
    doc: dict = {"target": {"id": target.id, "prompt": target.prompt}, "n_embeddings": settings.n_embeddings,
                 "attack": dict(settings.attack.__dict__), "starts": {}}
    seeds = inputs.seeds[: settings.replication_seeds]
    for name, (starts, adv) in sets.items():
        images = sample(bundle, adv, seeds, inputs.settings).images
        score = None
        if inputs.descriptor is not None:
            train = inputs.descriptor.embed([inputs.images("memorized")[settings.target]] * len(adv))
            score = sscd_orig(embed_generations(inputs.descriptor, images), train).max(axis=1)
        doc["starts"][name] = {
            "sscd_orig_max": score.tolist() if score is not None else None,
            "replicating_fraction": float(np.mean(score > 0.7)) if score is not None else None,
            "pairwise_l2_starts": pairwise_l2(starts).tolist(), "pairwise_l2_adv": pairwise_l2(adv).tolist(),
            "l2_start_to_adv": (adv - starts).flatten(1).norm(dim=1).tolist(),
        }
    starts, adv = sets["random"]
    y_mem = encode_prompts(bundle, inputs.prompts("memorized")).embeddings.float().cpu()
    doc["tsne"] = tsne(starts, adv)
    act_adv, act_mem = first_step_activations(bundle, adv), first_step_activations(bundle, y_mem)
    doc["discrepancy"] = {layer: {"adv": mean_discrepancy(act_adv[layer]), "mem": mean_discrepancy(act_mem[layer])}
                          for layer in act_adv}
    doc["agreement"] = {}
    for name in settings.selections:
        sel_adv, sel_mem = _selections(inputs, settings, name, adv), _selections(inputs, settings, name, y_mem)
        layers = sorted({k for s in sel_adv + sel_mem for k in s} | set(_layers_of(bundle, name)))
        doc["agreement"][name] = {
            "adv": mean_agreement(sel_adv, layers), "mem": mean_agreement(sel_mem, layers),
            "selected_per_embedding_adv": [sum(len(v) for v in s.values()) for s in sel_adv],
            "selected_per_prompt_mem": [sum(len(v) for v in s.values()) for s in sel_mem],
        }
    doc["summary"] = summary(doc)
    plot(inputs, doc, out)
    return doc, markdown(doc, inputs)


def _layers_of(bundle, name: str) -> list[str]:
    return list(value_layers(bundle.unet, "down_mid") if name == "nemo" else ffn_output_layers(bundle.unet))


def tsne(starts: torch.Tensor, adv: torch.Tensor) -> dict:
    from sklearn.manifold import TSNE

    both = torch.cat([starts, adv]).flatten(1).numpy()
    perplexity = float(min(30, max(2, (len(both) - 1) // 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, random_state=0, init="pca").fit_transform(both)
    return {"starts": xy[: len(starts)].tolist(), "adv": xy[len(starts):].tolist(), "perplexity": perplexity}


def summary(doc: dict) -> dict:
    ratio = {layer: d["adv"] / d["mem"] if d["mem"] > 0 else None for layer, d in doc["discrepancy"].items()}
    finite = [r for r in ratio.values() if r is not None]
    out = {"discrepancy_ratio_adv_over_mem": ratio,
           "discrepancy_ratio_median": float(np.median(finite)) if finite else None}
    for name, a in doc["agreement"].items():
        out[f"{name}_mean_agreement_adv"] = float(np.mean(list(a["adv"].values())))
        out[f"{name}_mean_agreement_mem"] = float(np.mean(list(a["mem"].values())))
    r = doc["starts"]["random"]
    out["replicating_fraction"] = r["replicating_fraction"]
    out["pairwise_l2_starts_median"] = float(np.median(r["pairwise_l2_starts"]))
    out["pairwise_l2_adv_median"] = float(np.median(r["pairwise_l2_adv"]))
    return out


def _short(layer: str) -> str:
    return (layer.replace("down_blocks.", "d").replace("up_blocks.", "u").replace("mid_block", "m")
            .replace(".attentions.", ".").replace(".transformer_blocks.", ".").replace(".attn2.to_v", ".v")
            .replace(".ff.net.2", ".ff"))


def plot(inputs: AnalysisInputs, doc: dict, out: Path) -> None:
    plt = pyplot()
    target = doc["target"]["id"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    t = doc["tsne"]
    axes[0].scatter(*np.asarray(t["starts"]).T, s=12, color="tab:blue", label="random starts N(0, I)")
    axes[0].scatter(*np.asarray(t["adv"]).T, s=12, color="tab:orange", label="adversarial embeddings (after Dori)")
    axes[0].set(xlabel="t-SNE 1", ylabel="t-SNE 2", title=f"(a) t-SNE, perplexity {t['perplexity']:g}")
    axes[0].legend(fontsize=7)
    boxes, names = [], []
    for name, r in doc["starts"].items():
        boxes += [r["pairwise_l2_starts"], r["pairwise_l2_adv"], r["l2_start_to_adv"]]
        names += [f"{name}: starts", f"{name}: adversarial", f"{name}: start -> adv"]
    axes[1].boxplot(boxes)
    axes[1].set_xticks(range(1, len(names) + 1), names, rotation=20, fontsize=7)
    axes[1].set(ylabel="L2 distance", title="(b) pairwise L2 (and start to optimum)")
    fig.suptitle(inputs.title(f"Locality in the input: {doc['n_embeddings']} adversarial embeddings for {target}"), fontsize=9)
    save_figure(fig, out / "locality_embeddings.png")

    layers = list(doc["discrepancy"])
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(layers)), 4.5))
    x = np.arange(len(layers))
    ax.bar(x - 0.2, [doc["discrepancy"][l]["adv"] for l in layers], 0.4, color="tab:orange",
           label=f"Y_adv ({doc['n_embeddings']} embeddings, one image)")
    ax.bar(x + 0.2, [doc["discrepancy"][l]["mem"] for l in layers], 0.4, color="tab:red",
           label="Y_mem (prompts of different memorized images)")
    ax.set_yscale("log")
    ax.set_xticks(x, [_short(l) for l in layers], rotation=60, fontsize=7)
    ax.set(xlabel="layer (.v: cross-attention value, .ff: feed-forward)", ylabel="mean pairwise ||a_i - a_j||^2 (Eq. 6)")
    ax.set_title(inputs.title("Activation discrepancy at the first denoising step"), fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, out / "locality_discrepancy.png")

    if doc["agreement"]:
        fig, axes = plt.subplots(1, len(doc["agreement"]), figsize=(7 * len(doc["agreement"]), 4.5), squeeze=False)
        for ax, (name, a) in zip(axes[0], doc["agreement"].items()):
            names = list(a["adv"])
            x = np.arange(len(names))
            ax.bar(x - 0.2, [a["adv"][l] for l in names], 0.4, color="tab:orange", label="across Y_adv")
            ax.bar(x + 0.2, [a["mem"][l] for l in names], 0.4, color="tab:red", label="across Y_mem")
            ax.set_xticks(x, [_short(l) for l in names], rotation=60, fontsize=7)
            ax.set(xlabel="layer", ylabel="mean IoU of selections (Eq. 7)", ylim=(0, 1.05), title=f"{name} weight agreement")
            ax.legend(fontsize=7)
        fig.suptitle(inputs.title("Weight agreement of the pruning selections"), fontsize=9)
        save_figure(fig, out / "locality_agreement.png")


def markdown(doc: dict, inputs: AnalysisInputs) -> MarkdownReport:
    md = MarkdownReport("Is memorization local? (paper 004 Sec. 4, App. J)")
    s = doc["summary"]
    md.paragraph(f"Target {doc['target']['id']} ('{doc['target']['prompt']}'); {doc['n_embeddings']} adversarial "
                 f"embeddings from random starts, Dori {doc['attack']['steps']} steps at lr {doc['attack']['lr']}.")
    md.key_values({k: v for k, v in s.items() if k != "discrepancy_ratio_adv_over_mem"})
    md.image("locality_embeddings.png", "embeddings")
    md.table([{"layer": l, "Y_adv": d["adv"], "Y_mem": d["mem"], "adv / mem": s["discrepancy_ratio_adv_over_mem"][l]}
              for l, d in doc["discrepancy"].items()])
    md.image("locality_discrepancy.png", "discrepancy")
    if doc["agreement"]:
        md.image("locality_agreement.png", "agreement")
    return md
