"""memtrain's Wanda against ConceptPrune's own masks on the golden fixture.

Source: ruchikachavhan/concept-prune@72927d9a2b518caed4e5dddd8549d04b168ad5d7,
wanda/wanda.py::main (per-timestep masks over the PNDM U-Net calls, skill_ratio 0.01),
neuron_receivers/wanda_receiver.py::Wanda.hook_fn (token-normalized input of ff.net.2),
utils/base_utils.py::ColumnNormCalculator.add_rows, utils/prompts.py::get_prompts (the null
string once per memorized prompt) and wanda/save_union_over_time.py::main (--timesteps 10
--select_ratio 0.0), run on the fixture with SD's PNDM (skip_prk_steps), 50 steps, guidance 7.5,
seed-0 latents at 16x16; the masks (flat indices per ff.net.2 layer) and the timesteps are in
tests/golden/conceptprune_wanda.json (`source` says how they were produced). Exact equality."""

import json
from pathlib import Path

import pytest

from golden_bundle import golden_bundle
from memtrain.mitigations import get_mitigation
from memtrain.mitigations.wanda import ffn_output_layers

GOLD = json.loads((Path(__file__).parent / "golden" / "conceptprune_wanda.json").read_text())
SETTINGS = GOLD["settings"]


@pytest.fixture(scope="module")
def bundle(golden):
    return golden_bundle(golden)


def _wanda():
    return get_mitigation("wanda", sparsity=SETTINGS["sparsity"], timesteps=SETTINGS["timesteps"],
                          scheduler=SETTINGS["scheduler"],
                          num_inference_steps=SETTINGS["num_inference_steps"],
                          guidance_scale=SETTINGS["guidance_scale"])


@pytest.mark.parametrize("case", sorted(GOLD["cases"]))
def test_wanda_masks_equal_conceptprunes(bundle, case):
    gold = GOLD["cases"][case]
    wanda = _wanda()
    seen = []
    hook = bundle.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1])))
    try:
        wanda.prepare(bundle, gold["prompts"], [], [SETTINGS["seed"]])
    finally:
        hook.remove()
    # statistics at ConceptPrune's first 10 PNDM calls (for the null run and each prompt)
    assert seen[:10] == gold["timesteps_first_10_calls"]
    masks = wanda.masks()
    assert sorted(masks) == sorted(gold["layers"]) == sorted(ffn_output_layers(bundle.unet))
    for name, layer in gold["layers"].items():
        assert list(wanda._shapes[name]) == layer["shape"], name
        assert masks[name].tolist() == layer["flat_indices"], name
        assert len(masks[name]) == layer["count"], name
    assert sum(len(m) for m in masks.values()) == gold["total_masked"]
