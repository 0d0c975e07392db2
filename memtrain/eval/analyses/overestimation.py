"""`overestimation` (paper 002 Sec. 3-4): how the sampler reaches a memorized image, under the
model's normal guidance, memorized against non-memorized prompts.

Per sampling step t, per trajectory (prompt x seed), x the training latent of the prompt's image:
- k = ||x0_hat|| / ||x|| (App. B.1), x0_hat predicted from the guided noise at that step;
- trace of the covariance of x_t across seeds (Fig. 7), per prompt;
- |cos| of the first principal component (uncentred) of dx_t = x_{t-1} - x_t across seeds with x (Fig. 8);
- the decomposition x_t = w0 x + wT x_T by least squares (Fig. 10; also with the final latent x0
  in place of x), and its three sums over steps (Fig. 11): sum(E[w0] - sqrt(abar)),
  -sum(E[wT] - sqrt(1 - abar)) and their difference, with each prompt's SSCD_Orig.
At "t = T" (Fig. 5): cos(eps_uncond, x_T), cos(eps_cond, x_T), cos(eps_uncond - x_T, -x) and
cos(eps_cond - x_T, -x). On a zero-terminal-SNR model (abar_T = 0, the testbed) every noise
prediction at t = T is exactly x_T, so the first step with abar_t > 0 is used and named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memtrain.core.report import MarkdownReport
from memtrain.eval.analyses.inputs import COLORS, GROUPS, AnalysisInputs, band, pyplot, record_steps, save_figure
from memtrain.metrics.signals import decomposition_weights

SUMS = ("excess_x", "suppressed_x_T", "overall_deviation")


@dataclass
class OverestimationSettings:
    """recipe `overestimation:`."""

    # None: the run's sampler. Paper 002 analyses DDIM; a stochastic sampler adds fresh noise each
    # step (and DDPM on a zero-terminal-SNR schedule drops x_T after the first step entirely)
    scheduler: str | None = None


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


def deviation_sums(w0: np.ndarray, wT: np.ndarray, abar: np.ndarray) -> dict[str, np.ndarray]:
    """Paper 002's three sums over steps of seed-averaged weights: w0, wT (N, K), abar (K,)."""
    excess = (w0 - np.sqrt(abar)).sum(axis=1)
    kept = (wT - np.sqrt(1 - abar)).sum(axis=1)
    return {"excess_x": excess, "suppressed_x_T": -kept, "overall_deviation": excess - kept}


def decompose(x_t: torch.Tensor, x0: torch.Tensor, x_T: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(w0, wT), each (K, N, S), of x_t (K, N, S, ...) = w0 x0 (N, S, ...) + wT x_T (N, S, ...)."""
    k = x_t.shape[0]
    flat = lambda v: v.flatten(0, 1)  # noqa: E731
    weights = torch.stack([decomposition_weights(flat(x_t[i]), flat(x0), flat(x_T)) for i in range(k)])
    weights = weights.reshape(k, *x_t.shape[1:3], 2).numpy()
    return weights[..., 0], weights[..., 1]


def pc1_alignment(x_t: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """(K-1, N) |cos| of the first right-singular vector of dx_t across seeds with x (N, ...)."""
    dx = (x_t[1:] - x_t[:-1]).flatten(3).double()  # (K-1, N, S, d)
    out = np.zeros(dx.shape[:2])
    for k in range(dx.shape[0]):
        for n in range(dx.shape[1]):
            v = torch.linalg.svd(dx[k, n], full_matrices=False).Vh[0]
            out[k, n] = abs(float(_cos(v[None], x[n].flatten()[None].double())))
    return out


def group_figures(inputs: AnalysisInputs, group: str, scheduler: str | None = None) -> dict:
    bundle, settings = inputs.bundle, inputs.settings
    if scheduler:
        settings = dataclasses.replace(settings, scheduler=scheduler)
    record = record_steps(bundle, inputs.prompts(group), inputs.seeds, settings)
    abar_all = bundle.make_scheduler(settings.scheduler).alphas_cumprod.double()
    abar = abar_all[record.timesteps].numpy()
    g = float(settings.guidance_scale)
    eps = record.eps_uncond + g * (record.eps_cond - record.eps_uncond)
    a = torch.as_tensor(abar).reshape(-1, *[1] * (eps.dim() - 1)).float()
    x0_hat = (record.x_t - (1 - a).sqrt() * eps) / a.sqrt().clamp_min(1e-4)
    x_T, x0_final = record.x_t[0], record.output.latents
    n, s = x_T.shape[:2]
    x = inputs.latents(group)
    doc: dict = {"n_prompts": n, "seeds": s}
    first = int(np.argmax(abar > 0))
    doc["t_T_used"] = int(record.timesteps[first])
    at_T = lambda v: v[first].flatten(0, 1)  # noqa: E731
    doc["cos_eps_uncond_x_T"] = _cos(at_T(record.eps_uncond), at_T(record.x_t)).tolist()
    doc["cos_eps_cond_x_T"] = _cos(at_T(record.eps_cond), at_T(record.x_t)).tolist()
    # a spread across seeds needs two of them; one seed has none (not zero)
    doc["trace_cov"] = record.x_t.flatten(3).var(dim=2, unbiased=True).sum(dim=-1).T.tolist() if s > 1 else None
    w0f, wTf = decompose(record.x_t, x0_final, x_T)
    doc["final_x0"] = {"w0": w0f.mean(axis=2).T.tolist(), "wT": wTf.mean(axis=2).T.tolist(),
                       **{k: v.tolist() for k, v in deviation_sums(w0f.mean(axis=2).T, wTf.mean(axis=2).T, abar).items()}}
    if x is not None:
        xs = x[:, None].expand(n, s, *x.shape[1:])
        norms = xs.flatten(2).norm(dim=2)  # (N, S)
        doc["k"] = (x0_hat.flatten(3).norm(dim=3) / norms[None]).mean(dim=2).T.tolist()  # (N, K)
        neg_x = -xs.flatten(0, 1)
        doc["cos_eps_uncond_minus_x_T_neg_x"] = _cos(at_T(record.eps_uncond) - at_T(record.x_t), neg_x).tolist()
        doc["cos_eps_cond_minus_x_T_neg_x"] = _cos(at_T(record.eps_cond) - at_T(record.x_t), neg_x).tolist()
        doc["pc1_cos_x"] = pc1_alignment(record.x_t, x).T.tolist()  # (N, K-1)
        w0, wT = decompose(record.x_t, xs, x_T)
        doc["training_x"] = {"w0": w0.mean(axis=2).T.tolist(), "wT": wT.mean(axis=2).T.tolist(),
                             **{k: v.tolist() for k, v in deviation_sums(w0.mean(axis=2).T, wT.mean(axis=2).T, abar).items()}}
    sscd = inputs.sscd_orig(group, record.output.images)
    doc["sscd_orig_max"] = sscd.max(axis=1).tolist() if sscd is not None else None
    doc["timesteps"], doc["abar"], doc["scheduler"] = record.timesteps, abar.tolist(), settings.scheduler
    return doc


def run(inputs: AnalysisInputs, settings: OverestimationSettings, out: Path) -> tuple[dict, MarkdownReport]:
    groups = {g: group_figures(inputs, g, settings.scheduler) for g in GROUPS if inputs.items[g]}
    doc: dict = {"groups": groups, "summary": {}}
    for g, r in groups.items():
        row = {"k_max_mean": float(np.max(np.mean(r["k"], axis=0))) if "k" in r else None,
               "trace_cov_step_quarter": float(np.mean(np.asarray(r["trace_cov"])[:, len(r["timesteps"]) // 4]))
               if r["trace_cov"] is not None else None,
               "cos_eps_cond_minus_x_T_neg_x": float(np.median(r["cos_eps_cond_minus_x_T_neg_x"]))
               if "cos_eps_cond_minus_x_T_neg_x" in r else None,
               "pc1_cos_x_first_quarter": float(np.mean(np.asarray(r["pc1_cos_x"])[:, : max(1, len(r["timesteps"]) // 4)]))
               if "pc1_cos_x" in r else None}
        basis = r.get("training_x", r["final_x0"])
        row.update({f"{k}_mean": float(np.mean(basis[k])) for k in SUMS})
        doc["summary"][g] = row
    doc["pearson_sscd"] = _pearson(groups)
    plot(inputs, groups, doc, out / "overestimation.png")
    md = MarkdownReport("Overestimation in early denoising (paper 002 Sec. 3-4)")
    first = next(iter(groups.values()))
    md.paragraph(f"Normal guidance ({inputs.settings.guidance_scale:g}), scheduler {first['scheduler']}. 't = T' figures at t = {first['t_T_used']} "
                 "(the first step with abar_t > 0). Deviation sums use the training latent x where the manifest has "
                 "images, else the final latent.")
    md.table([{"group": g, **row} for g, row in doc["summary"].items()])
    if doc["pearson_sscd"]:
        md.key_values({f"Pearson r (SSCD_Orig, {k})": v for k, v in doc["pearson_sscd"].items()})
    md.image("overestimation.png", "overestimation panels")
    return doc, md


def _pearson(groups: dict) -> dict:
    sscd, sums = [], {k: [] for k in SUMS}
    for r in groups.values():
        if r["sscd_orig_max"] is None or "training_x" not in r:
            return {}
        sscd += r["sscd_orig_max"]
        for k in SUMS:
            sums[k] += r["training_x"][k]
    if len(sscd) < 3 or np.std(sscd) == 0:
        return {}
    return {k: float(np.corrcoef(sscd, v)[0, 1]) for k, v in sums.items()}


def plot(inputs: AnalysisInputs, groups: dict, doc: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    any_group = next(iter(groups.values()))
    steps = np.arange(len(any_group["timesteps"]))
    label = lambda g: g.replace("_", "-")  # noqa: E731
    ax = axes[0, 0]
    for g, r in groups.items():
        if "k" in r:
            band(ax, steps, np.asarray(r["k"]), label(g), COLORS[g])
    ax.axhline(1.0, linestyle="--", color="grey", label="k = 1")
    ax.set(xlabel="sampling step", ylabel="k = ||x0_hat|| / ||x||", title="(a) magnitude of the x0 prediction")
    ax = axes[0, 1]
    keys = [("cos_eps_uncond_x_T", "eps_u, x_T"), ("cos_eps_cond_x_T", "eps_c, x_T"),
            ("cos_eps_uncond_minus_x_T_neg_x", "eps_u - x_T, -x"), ("cos_eps_cond_minus_x_T_neg_x", "eps_c - x_T, -x")]
    for j, (g, r) in enumerate(groups.items()):
        for i, (key, _) in enumerate(keys):
            if key in r:
                xs = np.full(len(r[key]), i + (j - 0.5) * 0.3)
                ax.plot(xs, r[key], "o", color=COLORS[g], alpha=0.6, markersize=4, label=label(g) if i == 0 else None)
    ax.set_xticks(range(len(keys)), [k[1] for k in keys], fontsize=8)
    ax.set(ylabel="cosine", title=f"(b) noise predictions at t = {any_group['t_T_used']}")
    ax = axes[0, 2]
    spread = {g: r["trace_cov"] for g, r in groups.items() if r["trace_cov"] is not None}
    for g, values in spread.items():
        band(ax, steps, np.asarray(values), label(g), COLORS[g])
    if spread:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "needs 2 or more seeds", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="sampling step", ylabel="trace Cov(x_t) across seeds", title="(c) latent diversity")
    ax = axes[1, 0]
    for g, r in groups.items():
        if "pc1_cos_x" in r:
            band(ax, steps[1:], np.asarray(r["pc1_cos_x"]), label(g), COLORS[g])
    ax.set(xlabel="sampling step", ylabel="|cos(PC1 of dx_t, x)|", title="(d) update direction vs the training latent")
    ax = axes[1, 1]
    abar = np.asarray(any_group["abar"])
    ax.plot(steps, np.sqrt(abar), "k--", label="sqrt(abar_t)")
    ax.plot(steps, np.sqrt(1 - abar), "k:", label="sqrt(1 - abar_t)")
    for g, r in groups.items():
        basis = r.get("training_x", r["final_x0"])
        ax.plot(steps, np.mean(basis["w0"], axis=0), color=COLORS[g], label=f"w0, {label(g)}")
        ax.plot(steps, np.mean(basis["wT"], axis=0), color=COLORS[g], linestyle="-.", label=f"wT, {label(g)}")
    ax.set(xlabel="sampling step", ylabel="least-squares weight",
           title="(e) x_t = w0 x + wT x_T" + ("" if "training_x" in any_group else " (x: final latent)"))
    ax = axes[1, 2]
    for g, r in groups.items():
        basis = r.get("training_x", r["final_x0"])
        if r["sscd_orig_max"] is not None:
            ax.plot(basis["overall_deviation"], r["sscd_orig_max"], "o", color=COLORS[g], label=label(g))
    r_text = doc["pearson_sscd"].get("overall_deviation")
    ax.set(xlabel="overall deviation: sum (w0 - sqrt abar) - (wT - sqrt(1 - abar))", ylabel="SSCD_Orig (max over seeds)",
           title="(f) deviation vs copying" + (f" (Pearson r = {r_text:.2f})" if r_text is not None else ""))
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    sampler = dataclasses.replace(inputs.settings, scheduler=any_group["scheduler"])
    fig.suptitle(inputs.title("Overestimation (paper 002)", sampler), fontsize=10)
    save_figure(fig, path)
