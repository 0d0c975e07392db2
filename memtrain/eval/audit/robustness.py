"""Robustness curves (issue #12): MR under attack against the attack budget, per mitigation and
threat model, with the held-out control, from one attack run per target (the first b steps of the
full attack are the b-step attack: Adam with a fixed learning rate, the same noise stream).
Recipe key `robustness_budgets`; report.json `results[].robustness`; `robustness.png`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from memtrain.eval.audit.stages import Context, stage_figures


def curve_budgets(ctx: Context) -> list[int]:
    """The robustness curve's budgets below the attack's full budget (which is the curve's last point)."""
    return sorted({b for b in ctx.recipe.robustness_budgets if b < ctx.attack.steps})


def robustness_curve(ctx: Context, gathered: dict, space: str, result: dict) -> dict:
    """MR under attack and of the control against the attack budget, the last point the full attack."""
    budgets = curve_budgets(ctx)
    attack = [stage_figures(gathered[f"curve.attack.{space}.{b}"], ctx)["mr"] for b in budgets]
    control = [stage_figures(gathered[f"curve.control.{space}.{b}"], ctx)["mr"] for b in budgets]
    return {"budgets": budgets + [ctx.attack.steps], "mr_attack": attack + [result["mr_attack"]],
            "mr_control": control + [result["mr_control"]]}


def plot_robustness(results: Sequence[dict], path: Path) -> Path | None:
    """One PNG: MR under attack (solid) and of the control (dashed) against the budget, per result."""
    curves = [r for r in results if "robustness" in r]
    embedding = {r["mitigation"] for r in curves if r["threat_model"] == "embedding"}
    # a weight edit's `weights` row is its embedding attack again: drawn once
    curves = [r for r in curves if not (r["threat_model"] == "weights" and r["mitigation"] in embedding)]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    colors = plt.get_cmap("tab20")
    for k, r in enumerate(curves):
        c = r["robustness"]
        color = colors(k % 20)
        numeric = lambda ys: [y if isinstance(y, (int, float)) else float("nan") for y in ys]  # noqa: E731
        style = ":o" if r["threat_model"] == "prompt" else "-o"
        ax.plot(c["budgets"], numeric(c["mr_attack"]), style, color=color, label=r["label"], markersize=3)
        ax.plot(c["budgets"], numeric(c["mr_control"]), "--", color=color, alpha=0.4, linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("attack budget (steps)")
    ax.set_ylabel("MR")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("MR under attack (solid: embedding, dotted: hard prompt) and held-out control (dashed)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
