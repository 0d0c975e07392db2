"""`guidance` (paper 003 Fig. 2, Alg. 1): the conditional-guidance magnitude
d_t = ||eps(x_t, e_p) - eps(x_t, e_null)||^2 at every sampling step of a trajectory sampled
under zero guidance (the unconditional prediction drives it), memorized against non-memorized
prompts, with the static transition point (guidance_static's transition_t) and each
trajectory's dynamic one (the first local minimum of d_t, guidance_dynamic's switch) marked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memtrain.core.report import MarkdownReport
from memtrain.eval.analyses.inputs import COLORS, GROUPS, AnalysisInputs, band, pyplot, record_steps, save_figure
from memtrain.metrics.signals import first_local_minimum, guidance_magnitude
from memtrain.mitigations import GuidanceStatic


@dataclass
class GuidanceSettings:
    """recipe `guidance:`: the static transition point drawn (paper 003 Sec. 5: t = 500)."""

    transition_t: int = 500


def magnitudes(inputs: AnalysisInputs, group: str):
    """(N*S, K) d_t per trajectory under zero guidance and the K timesteps."""
    record = record_steps(inputs.bundle, inputs.prompts(group), inputs.seeds, inputs.settings,
                          scale=lambda *args: 0.0)
    k, n, s = record.x_t.shape[:3]
    d = guidance_magnitude(record.eps_cond.flatten(0, 2), record.eps_uncond.flatten(0, 2)).reshape(k, n * s)
    return d.T.numpy(), record.timesteps


def run(inputs: AnalysisInputs, settings: GuidanceSettings, out: Path) -> tuple[dict, MarkdownReport]:
    static_t = GuidanceStatic(transition_t=settings.transition_t).transition(
        inputs.bundle.scheduler.config.num_train_timesteps)
    doc: dict = {"static_transition_t": static_t, "groups": {}}
    curves = {}
    for group in GROUPS:
        if not inputs.items[group]:
            continue
        d, timesteps = magnitudes(inputs, group)
        points = [first_local_minimum(row) for row in d]
        found = [p for p in points if p is not None]
        curves[group] = d
        doc["timesteps"] = timesteps
        doc["groups"][group] = {
            "n_prompts": len(inputs.items[group]), "n_trajectories": int(d.shape[0]),
            "mean_per_step": d.mean(axis=0).tolist(), "std_per_step": d.std(axis=0).tolist(),
            "mean_first_quarter": float(d[:, : max(1, d.shape[1] // 4)].mean()),
            "dynamic_transition_steps": points,
            "fraction_with_transition": len(found) / len(points),
            "mean_dynamic_transition_t": (float(np.mean([timesteps[p] for p in found])) if found else None),
        }
    timesteps = doc["timesteps"]
    static_step = next((k for k, t in enumerate(timesteps) if t <= static_t), len(timesteps) - 1)
    doc["static_transition_step"] = static_step
    plot(inputs, curves, timesteps, static_step, doc, out / "guidance.png")

    md = MarkdownReport("Conditional-guidance magnitude under zero guidance (paper 003 Fig. 2)")
    md.paragraph("d_t = ||eps(x_t, prompt) - eps(x_t, \"\")||^2 per sampling step; the trajectory is sampled "
                 "with the unconditional prediction alone (guidance 0). Dashed: the static transition "
                 f"point t = {static_t}; dots: each trajectory's dynamic transition point (the first local "
                 "minimum of d_t, where guidance_dynamic switches guidance on).")
    md.table([{"group": g, "trajectories": r["n_trajectories"], "mean d_t, first quarter": r["mean_first_quarter"],
               "with a transition point": r["fraction_with_transition"],
               "mean dynamic transition t": r["mean_dynamic_transition_t"]} for g, r in doc["groups"].items()])
    md.image("guidance.png", "guidance magnitude per step")
    return doc, md


def plot(inputs: AnalysisInputs, curves: dict, timesteps: list[int], static_step: int, doc: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = np.arange(len(timesteps))
    for group, d in curves.items():
        band(ax, steps, d, group.replace("_", "-"), COLORS[group])
        points = [p for p in doc["groups"][group]["dynamic_transition_steps"] if p is not None]
        if points:
            ax.plot(points, [d.mean(axis=0)[p] for p in points], "o", color=COLORS[group], alpha=0.5, markersize=4,
                    label=f"{group.replace('_', '-')}: dynamic transition points ({len(points)}/{d.shape[0]})")
    ax.axvline(static_step, linestyle="--", color="grey", label=f"static transition (t = {timesteps[static_step]})")
    if all((d[:, 1:] > 0).all() for d in curves.values()):
        ax.set_yscale("log")  # step 0 of a zero-terminal-SNR model is exactly 0 and drops off a log axis
    ax.set_xlabel(f"sampling step (t = {timesteps[0]} ... {timesteps[-1]})")
    ax.set_ylabel("||eps_cond - eps_uncond||^2")
    ax.set_title(inputs.title("Guidance magnitude under zero guidance"), fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)
