"""`interventions` (paper 000 Sec. 3, Tables 2-3): mask or replace the sot / prompt / eot / pad
parts of the text embedding and see what the model still generates.

The paper's case definitions lost their symbols in our copy; our reading, from its text
("(a) ... we retain only v_pr", "(e) ... retaining only v_eot", "(g) ... using v_pad to
compensate for the insufficient length", "(h) we isolate the effect of v_pad by masking them"):

    (a) v_eot and v_pad masked          (e) v_pr and v_pad replaced with v_eot
    (b) v_pr replaced with v_eot        (f) v_eot masked
    (c) v_pr masked                     (g) v_pr and v_eot replaced with v_pad
    (d) v_pad replaced with v_eot       (h) v_pad masked

Masking means a zero vector (Sec. 3.1 (a)). "Replaced with v_eot": every such position takes the
row's eot embedding. "Replaced with v_pad": the k-th replaced position takes the k-th pad
embedding, cycling when the row has fewer pads than positions to fill. v_sot is never touched.
Per case: SSCD_Orig (against the training image; max over seeds, median over prompts), MR,
SSCD_Gen (against the same seed's unmodified generation: the paper's "SSCD") and D_SSCD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from memtrain.core.errors import MemtrainError
from memtrain.core.report import MarkdownReport
from memtrain.core.text import TextEmbedding, TokenLayout, encode_prompts
from memtrain.eval.analyses.inputs import COLORS, GROUPS, AnalysisInputs, pyplot, save_figure
from memtrain.eval.measure import embed_generations
from memtrain.core.sampling import sample
from memtrain.metrics import diversity_dsscd, sscd_gen

# case -> (parts masked, parts replaced with v_eot, parts replaced with v_pad)
CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "a": (("eot", "pad"), (), ()),
    "b": ((), ("prompt",), ()),
    "c": (("prompt",), (), ()),
    "d": ((), ("pad",), ()),
    "e": ((), ("prompt", "pad"), ()),
    "f": (("eot",), (), ()),
    "g": ((), (), ("prompt", "eot")),
    "h": (("pad",), (), ()),
}


def describe(case: str) -> str:
    masked, to_eot, to_pad = CASES[case]
    parts = [f"v_{'/v_'.join(masked)} masked"] if masked else []
    parts += [f"v_{'/v_'.join(to_eot)} -> v_eot"] if to_eot else []
    parts += [f"v_{'/v_'.join(to_pad)} -> v_pad"] if to_pad else []
    return "; ".join(parts)


def intervene(embeddings: torch.Tensor, layout: TokenLayout, case: str) -> torch.Tensor:
    """The embeddings (B, L, D) with one case's masking / replacement applied."""
    masked, to_eot, to_pad = CASES[case]
    out = embeddings.clone()
    mask_of = {"prompt": layout.prompt, "eot": layout.eot, "pad": layout.pad}
    for b in range(out.shape[0]):
        for part in masked:
            out[b, mask_of[part][b]] = 0.0
        for part in to_eot:
            out[b, mask_of[part][b]] = embeddings[b, layout.eot_index[b]]
        if to_pad:
            pads = embeddings[b, layout.pad[b]]
            if len(pads) == 0:
                raise MemtrainError(f"intervention ({case}) replaces with v_pad, but a prompt fills all "
                                    f"{embeddings.shape[1]} positions (no pad): drop it from the manifest")
            where = torch.zeros_like(layout.pad[b])
            for part in to_pad:
                where |= mask_of[part][b]
            index = torch.arange(int(where.sum())) % len(pads)
            out[b, where] = pads[index]
    return out


@dataclass
class InterventionSettings:
    """recipe `interventions:`: which cases run (default all eight)."""

    cases: list[str] = field(default_factory=lambda: list(CASES))

    def __post_init__(self) -> None:
        for case in self.cases:
            if case not in CASES:
                raise MemtrainError(f"interventions: unknown case '{case}': choose from {', '.join(CASES)}")


def run(inputs: AnalysisInputs, settings: InterventionSettings, out: Path) -> tuple[dict, MarkdownReport]:
    if inputs.descriptor is None:
        raise MemtrainError("interventions needs a copy descriptor (SSCD): pass --metric")
    doc: dict = {"cases": {c: describe(c) for c in ["original", *settings.cases] if c != "original"}, "groups": {}}
    for group in GROUPS:
        if not inputs.items[group]:
            continue
        encoded: TextEmbedding = encode_prompts(inputs.bundle, inputs.prompts(group))
        rows = {}
        reference = None
        for case in ["original", *settings.cases]:
            cond = encoded.embeddings if case == "original" else intervene(encoded.embeddings, encoded.layout, case)
            images = sample(inputs.bundle, cond, inputs.seeds, inputs.settings).images
            gen = embed_generations(inputs.descriptor, images)
            reference = gen if case == "original" else reference
            row: dict = {"sscd_gen_mean": float(sscd_gen(gen, reference).mean())}
            orig = inputs.sscd_orig(group, images)
            if orig is not None:
                per_prompt = orig.max(axis=1)
                row.update(sscd_orig_median=float(np.median(per_prompt)), sscd_orig_mean=float(per_prompt.mean()),
                           sscd_orig_std=float(per_prompt.std()), mr=float(np.mean(per_prompt > 0.7)))
            if len(inputs.seeds) > 1:
                row["d_sscd"] = float(np.mean(diversity_dsscd(gen)))
            rows[case] = row
        doc["groups"][group] = {"n_prompts": len(inputs.items[group]), "rows": rows}
    plot(inputs, doc, out / "interventions.png")
    md = MarkdownReport("Text-embedding interventions (paper 000 Sec. 3)")
    md.paragraph("Masked = zero vector. SSCD_Gen: against the unmodified embedding's generation with the same "
                 "seed (the paper's 'SSCD'); SSCD_Orig and MR (> 0.7) against the training image; D_SSCD: "
                 "mean pairwise similarity across seeds. Case definitions are our reading of the paper "
                 "(memtrain/eval/analyses/interventions.py).")
    for group, g in doc["groups"].items():
        md.heading(f"{group.replace('_', '-')} prompts ({g['n_prompts']})", 3)
        md.table([{"case": c, "intervention": doc["cases"].get(c, "none"), **r} for c, r in g["rows"].items()])
    md.image("interventions.png", "interventions")
    return doc, md


def plot(inputs: AnalysisInputs, doc: dict, path: Path) -> None:
    plt = pyplot()
    metrics = [("sscd_orig_median", "SSCD_Orig (median of max over seeds)"), ("mr", "MR (SSCD_Orig > 0.7)"),
               ("sscd_gen_mean", "SSCD_Gen (vs unmodified)"), ("d_sscd", "D_SSCD (seed diversity)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(16, 4))
    for ax, (key, name) in zip(axes, metrics):
        for j, (group, g) in enumerate(doc["groups"].items()):
            cases = list(g["rows"])
            values = [g["rows"][c].get(key, np.nan) for c in cases]
            ax.bar(np.arange(len(cases)) + (j - 0.5) * 0.4, values, width=0.4, color=COLORS[group],
                   label=group.replace("_", "-"))
            ax.set_xticks(range(len(cases)), ["orig" if c == "original" else f"({c})" for c in cases])
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set(ylabel=name, xlabel="intervention case", ylim=(-0.1, 1.3))
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.suptitle(inputs.title("Text-embedding interventions (paper 000)"), fontsize=10)
    save_figure(fig, path)
