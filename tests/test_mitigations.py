"""Mitigations on a tiny random SD1.x-shaped bundle: each changes only what it claims, undo is
bit-exact, the text path stays differentiable, state round-trips through a file."""

from __future__ import annotations

import pytest
import torch

from factories import tiny_bundle
from memtrain.core.errors import MemtrainError
from memtrain.mitigations import applied, available_mitigations, get_mitigation
from memtrain.core.bundle import weights_checksum
from memtrain.metrics.ms_ssim import ms_ssim, ms_ssim_settings
from memtrain.mitigations.wanda import ffn_output_layers
from memtrain.train.checkpoints import param_checksum
from memtrain.core.sampling import SamplerSettings, sample
from memtrain.core.text import encode_prompts

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night"]
REFERENCE = ["a red car", "a house by the sea", "two dogs on a beach", "a bowl of fruit"]
SEEDS = [0, 1, 2]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture
def bundle(tokenizer):
    return tiny_bundle(None, tokenizer=tokenizer)


def unet_state(bundle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bundle.unet.state_dict().items()}


def changed_params(before: dict, bundle) -> set[str]:
    after = bundle.unet.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def images(bundle, mitigation=None):
    cond = mitigation.encode(bundle, PROMPTS[:1]) if mitigation else PROMPTS[:1]
    return sample(bundle, cond, [0, 1], settings=SamplerSettings(guidance_scale=3.0, num_inference_steps=3)).images


# --- registry -----------------------------------------------------------------------------------

def test_registry_lists_and_builds():
    assert {"none", "pad_eot", "pad_mask", "nemo", "wanda"} <= set(available_mitigations())
    assert get_mitigation("PAD-EOT", eot_replacement="pad").eot_replacement == "pad"
    assert get_mitigation("pad_mask").settings() == {"fraction": 0.7, "which": "random", "seed": 0}


def test_registry_errors_name_the_choices():
    with pytest.raises(MemtrainError, match="unknown mitigation 'nope'.*nemo.*pad_eot.*wanda"):
        get_mitigation("nope")
    with pytest.raises(MemtrainError, match="unknown recipe key 'mitigations.pad_mask.colour'"):
        get_mitigation("pad_mask", colour=1)
    with pytest.raises(MemtrainError, match="'mitigations.nemo.num_seeds' must be int"):
        get_mitigation("nemo", num_seeds="ten")  # typed before any model loads
    with pytest.raises(MemtrainError, match="eot_replacement"):
        get_mitigation("pad_eot", eot_replacement="mean")
    with pytest.raises(MemtrainError, match="fraction"):
        get_mitigation("pad_mask", fraction=1.5)
    with pytest.raises(MemtrainError, match="sparsity"):
        get_mitigation("wanda", sparsity=0)


def test_none_is_identity(bundle):
    mitigation = get_mitigation("none")
    before = unet_state(bundle)
    with applied(mitigation, bundle):
        encoded = mitigation.encode(bundle, PROMPTS)
    assert torch.equal(encoded.embeddings, encode_prompts(bundle, PROMPTS).embeddings)
    assert not changed_params(before, bundle)
    assert mitigation.describe()["name"] == "none"


# --- pad/eot ------------------------------------------------------------------------------------

def test_pad_eot_tokenizer_and_eot_row(bundle):
    mitigation = get_mitigation("pad_eot")
    before = unet_state(bundle)
    tok = mitigation.tokenizer(bundle)
    assert tok.pad_token_id == 0 and bundle.tokenizer.pad_token_id == 49407  # bundle's untouched
    raw = encode_prompts(bundle, PROMPTS, tokenizer=tok)
    out = mitigation.encode(bundle, PROMPTS)
    layout = out.layout
    assert (out.input_ids[layout.pad] == 0).all()
    assert (out.input_ids[layout.eot] == tok.eos_token_id).all()
    assert (out.embeddings[layout.eot] == 0).all()
    keep = ~layout.eot
    assert torch.equal(out.embeddings[keep], raw.embeddings[keep])
    with applied(mitigation, bundle):
        pass
    assert not changed_params(before, bundle)
    assert "zero vector" in mitigation.describe()["eot_replaced_by"]


def test_pad_eot_pad_replacement(bundle):
    mitigation = get_mitigation("pad_eot", eot_replacement="pad")
    out = mitigation.encode(bundle, PROMPTS)
    rows = torch.arange(len(PROMPTS))
    eot = out.layout.eot_index
    assert torch.equal(out.embeddings[rows, eot], out.embeddings[rows, eot + 1])
    assert "'!' pad position" in mitigation.describe()["eot_replaced_by"]


def test_pad_mask_zeroes_exactly_the_fraction(bundle):
    raw = encode_prompts(bundle, PROMPTS)
    for which in ("random", "first"):
        mitigation = get_mitigation("pad_mask", which=which)
        out = mitigation.encode(bundle, PROMPTS)
        assert torch.equal(out.input_ids, raw.input_ids)  # tokenizer unchanged
        masked = mitigation.masked_positions(raw.layout)
        for row in range(len(PROMPTS)):
            n_pad = int(raw.layout.pad[row].sum())
            zero_rows = (out.embeddings[row] == 0).all(dim=-1)
            assert int(zero_rows.sum()) == round(0.7 * n_pad)
            assert torch.equal(zero_rows, masked[row])
            assert (raw.layout.pad[row] | ~zero_rows).all()  # only pad rows are zeroed
            keep = ~zero_rows
            assert torch.equal(out.embeddings[row][keep], raw.embeddings[row][keep])
        if which == "first":
            row0 = masked[0].nonzero().flatten()
            first_pad = int(raw.layout.eot_index[0]) + 1
            assert row0.tolist() == list(range(first_pad, first_pad + len(row0)))
    assert "seeded with 0" in get_mitigation("pad_mask").describe()["masked_pads"]


def test_pad_mask_subset_does_not_depend_on_batch(bundle):
    mitigation = get_mitigation("pad_mask", fraction=0.5, seed=3)
    alone = mitigation.masked_positions(encode_prompts(bundle, PROMPTS[:1]).layout)
    batched = mitigation.masked_positions(encode_prompts(bundle, [PROMPTS[1], PROMPTS[0]]).layout)
    assert torch.equal(alone[0], batched[1])


@pytest.mark.parametrize("name,settings", [
    ("pad_eot", {"eot_replacement": "zero"}), ("pad_eot", {"eot_replacement": "pad"}),
    ("pad_mask", {}), ("none", {}),
])
def test_transform_embeddings_is_differentiable(bundle, name, settings):
    mitigation = get_mitigation(name, **settings)
    layout = mitigation.encode(bundle, PROMPTS).layout
    adversarial = torch.randn(len(PROMPTS), 77, bundle.embedding_dim, requires_grad=True)
    out = mitigation.transform_embeddings(adversarial, layout)
    (out * torch.randn_like(out)).sum().backward()
    assert adversarial.grad is not None and adversarial.grad.abs().sum() > 0
    untouched = (out == adversarial).all(dim=-1)
    assert (adversarial.grad[untouched] != 0).any(dim=-1).all()


# --- NeMo ---------------------------------------------------------------------------------------

def prepared_nemo(bundle, **settings):
    # tau_mem -1: every seed counts as memorized, so a random model still goes through the whole
    # detection -> initial selection -> refinement path
    defaults = dict(tau_mem=-1.0, num_seeds=3, num_inference_steps=10, refinement_budget=40)
    nemo = get_mitigation("nemo", **{**defaults, **settings})
    nemo.prepare(bundle, PROMPTS, REFERENCE, SEEDS)
    return nemo


def test_nemo_prunes_only_selected_value_rows(bundle):
    nemo = prepared_nemo(bundle)
    neurons = nemo.neurons()
    assert neurons and all(name.endswith("attn2.to_v") for name in neurons)
    assert not any(name.startswith("up_blocks") for name in neurons)  # NeMo's down+mid layers
    record = nemo.describe()["prompts"][PROMPTS[0]]
    assert record["memorized"] and record["initial"] and record["refined_score"] is not None
    for layer, rows in record["refined"].items():
        assert set(rows) <= set(record["initial"][layer])  # refinement only drops neurons
    before = unet_state(bundle)
    reference = images(bundle)
    with applied(nemo, bundle):
        changed = changed_params(before, bundle)
        assert changed == {f"{layer}.weight" for layer in neurons}
        after = bundle.unet.state_dict()
        for layer, rows in neurons.items():
            weight, original = after[f"{layer}.weight"], before[f"{layer}.weight"]
            zeroed = (weight == 0).all(dim=1).nonzero().flatten().tolist()
            assert zeroed == rows
            keep = torch.ones(len(weight), dtype=torch.bool)
            keep[rows] = False
            assert torch.equal(weight[keep], original[keep])
        assert not torch.equal(images(bundle), reference)
    assert not changed_params(before, bundle)
    assert torch.equal(images(bundle), reference)


def test_nemo_per_prompt_and_state_round_trip(bundle, tmp_path):
    nemo = prepared_nemo(bundle)
    single = nemo.for_prompts(PROMPTS[:1])
    expected = {l: r for l, r in nemo.describe()["prompts"][PROMPTS[0]]["refined"].items() if r}
    assert single.neurons() == expected
    path = tmp_path / "nemo.safetensors"
    nemo.save(path)
    loaded = get_mitigation("nemo", **nemo.settings())
    loaded.load(path)
    assert loaded.neurons() == nemo.neurons()
    with applied(nemo, bundle):
        first = unet_state(bundle)
    with applied(loaded, bundle):
        assert not changed_params(first, bundle)
    with pytest.raises(MemtrainError, match="no neurons were localized"):
        nemo.for_prompts(["never seen"])


def test_nemo_unmemorized_prompt_prunes_nothing(bundle):
    nemo = prepared_nemo(bundle, tau_mem=1.0)  # SSIM never exceeds 1: nothing is memorized
    assert not any(r["memorized"] for r in nemo.describe()["prompts"].values())
    before = unet_state(bundle)
    with applied(nemo, bundle):
        assert not changed_params(before, bundle)


def test_nemo_auto_threshold_and_zero_snr_v_prediction(tokenizer):
    # the testbed's schedule: at t = T eps_pred == x_T, so the signal must come from x0-hat
    bundle = tiny_bundle(None, tokenizer=tokenizer, prediction_type="v_prediction",
                         rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0)
    nemo = get_mitigation("nemo", tau_mem="auto", num_seeds=3, num_inference_steps=10,
                          timestep_index=0, refinement_budget=5)
    nemo.prepare(bundle, PROMPTS[:1], REFERENCE, SEEDS)
    record = nemo.describe()["prompts"][PROMPTS[0]]
    assert -1.0 <= nemo.describe()["tau_mem_used"] <= 1.0
    assert 0.0 <= record["memorization_score"] < 0.999  # informative, not a constant image


def test_nemo_needs_statistics(bundle, tmp_path):
    with pytest.raises(MemtrainError, match="reference prompts.*mitigation_settings.nemo.statistics") as err:
        get_mitigation("nemo").prepare(bundle, PROMPTS, [], SEEDS)
    assert "\n" not in str(err.value)
    with pytest.raises(MemtrainError, match="does not exist"):
        get_mitigation("nemo", statistics=str(tmp_path / "none.safetensors")).prepare(bundle, PROMPTS, [], SEEDS)


def test_nemo_statistics_computed_once_then_cached(bundle, tmp_path):
    from memtrain.mitigations.nemo import value_layers

    cache = tmp_path / "stats" / "nemo_stats.safetensors"
    first = prepared_nemo(bundle, statistics=str(cache))
    assert cache.is_file() and not list(cache.parent.glob(".*partial"))
    # without reference prompts the cached statistics are used: the same neurons come out
    again = get_mitigation("nemo", **{**first.settings(), "tau_mem": -1.0})
    again.prepare(bundle, PROMPTS, [], SEEDS)
    assert again.neurons() == first.neurons()
    state = first.state_dict()
    layers = value_layers(bundle.unet)
    assert all(torch.equal(again.state_dict()[f"mean.{n}"], state[f"mean.{n}"]) for n in layers)
    # a file for another model (a layer's width differs) is refused by name
    from safetensors.torch import save_file
    wrong = tmp_path / "wrong.safetensors"
    save_file({f"{k}.{n}": torch.zeros(3) for n in layers for k in ("mean", "std")}, str(wrong))
    with pytest.raises(MemtrainError, match="do not fit this model"):
        get_mitigation("nemo", statistics=str(wrong)).prepare(bundle, PROMPTS, [], SEEDS)


def test_nemo_reads_and_writes_its_published_statistics_format(bundle, tmp_path):
    from memtrain.mitigations.nemo import value_layers

    # NeMo's own file (1_compute_activations_statistics.py): torch.save((mean_list, std_list)),
    # one tensor per value layer in data-flow order; a .pt name is written in that format
    cache = tmp_path / "statistics.pt"
    first = prepared_nemo(bundle, statistics=str(cache))
    mean, std = torch.load(cache, map_location="cpu", weights_only=True)
    layers = value_layers(bundle.unet)
    assert [m.shape[0] for m in mean] == [layer.out_features for layer in layers.values()] and len(std) == len(mean)
    assert torch.equal(mean[0], first.state_dict()[f"mean.{next(iter(layers))}"])
    again = get_mitigation("nemo", **{**first.settings(), "tau_mem": -1.0})
    again.prepare(bundle, PROMPTS, [], SEEDS)
    assert again.neurons() == first.neurons()
    torch.save((mean, std[:-1]), tmp_path / "short.pt")
    with pytest.raises(MemtrainError, match=r"short\.pt.*std tensors where this model has"):
        get_mitigation("nemo", statistics=str(tmp_path / "short.pt")).prepare(bundle, PROMPTS, [], SEEDS)


def test_models_without_the_layers_are_refused(tokenizer):
    bundle = tiny_bundle(None, tokenizer=tokenizer, cross_attention=False)
    with pytest.raises(MemtrainError, match="attn2.to_v") as err:
        get_mitigation("nemo").prepare(bundle, PROMPTS, REFERENCE, SEEDS)
    assert "attn2.to_v" in str(err.value) and "tiny-random-sd" in str(err.value)
    with pytest.raises(MemtrainError, match="ff.net.2.*tiny-random-sd|tiny-random-sd.*ff.net.2"):
        get_mitigation("wanda").prepare(bundle, PROMPTS, [], SEEDS)


def test_ms_ssim_basics():
    x = torch.rand(2, 4, 64, 64)
    assert torch.allclose(ms_ssim(x, x), torch.ones(2), atol=1e-5)
    assert (ms_ssim(x, torch.rand(2, 4, 64, 64)) < 0.5).all()
    assert ms_ssim_settings(64, 64) == (11, 3)
    assert ms_ssim_settings(16, 16) == (11, 1)
    assert ms_ssim_settings(8, 8) == (7, 1)


# --- Wanda --------------------------------------------------------------------------------------

def prepared_wanda(bundle, **settings):
    defaults = dict(sparsity=1 / 32, timesteps=3, num_inference_steps=10, num_seeds=2)
    wanda = get_mitigation("wanda", **{**defaults, **settings})
    wanda.prepare(bundle, PROMPTS, [], SEEDS)
    return wanda


def test_wanda_pooled_prunes_exactly_the_sparsity(bundle):
    wanda = prepared_wanda(bundle, aggregate="pooled")
    before = unet_state(bundle)
    reference = images(bundle)
    with applied(wanda, bundle):
        changed = changed_params(before, bundle)
        assert changed and all(name.endswith("ff.net.2.weight") for name in changed)
        after = bundle.unet.state_dict()
        for name in changed:
            zeroed = (after[name] == 0) & (before[name] != 0)
            assert zeroed.float().mean().item() == pytest.approx(1 / 32, abs=0)
            assert zeroed.sum(dim=1).unique().tolist() == [after[name].shape[1] // 32]
            assert torch.equal(after[name][~zeroed], before[name][~zeroed])
        assert not torch.equal(images(bundle), reference)
    assert not changed_params(before, bundle)
    assert torch.equal(images(bundle), reference)
    assert wanda.describe()["pruned_fraction"] == pytest.approx(1 / 32)


def test_wanda_union_over_timesteps(bundle):
    wanda = prepared_wanda(bundle)  # ConceptPrune: per-timestep masks, OR-ed
    fractions = wanda.describe()["pruned_fraction_per_layer"]
    assert len(fractions) == 7  # every transformer block's ff.net.2 (down, mid, up)
    for fraction in fractions.values():
        assert 0 < fraction <= 3 / 32  # <= k per row per timestep, 3 timesteps
    before = unet_state(bundle)
    with applied(wanda, bundle):
        after = bundle.unet.state_dict()
        for name, index in wanda.masks().items():
            flat = after[f"{name}.weight"].flatten()
            assert (flat[index] == 0).all()
            assert int((flat == 0).sum()) == len(index)
    assert not changed_params(before, bundle)


@pytest.mark.parametrize("include_uncond", [True, False])
def test_wanda_column_norms_equal_a_direct_computation(bundle, include_uncond):
    """The squared column norms summed on the layers' device equal the sums computed in float64
    from every input ff.net.2 received (batches of 3 jobs: 2 chunks, so step = call % 3)."""
    wanda = get_mitigation("wanda", timesteps=3, num_inference_steps=10, num_seeds=2, batch_size=3,
                           include_uncond=include_uncond)
    layers = ffn_output_layers(bundle.unet)
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [layer.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0].double()))
               for name, layer in layers.items()]
    try:
        got = wanda._column_sq_norms(bundle, layers, PROMPTS, SEEDS[:2])
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in layers.items():
        assert len(inputs[name]) == 6  # 2 chunks x 3 steps
        expected = torch.zeros(3, layer.in_features, dtype=torch.float64)
        for call, x in enumerate(inputs[name]):
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            rows = x if include_uncond else x[len(x) // 2:]  # [uncond half; cond half]
            expected[call % 3] += (rows ** 2).sum(dim=(0, 1))
        assert got[name].device.type == "cpu" and got[name].dtype == torch.float32
        torch.testing.assert_close(got[name].double(), expected, rtol=2e-6, atol=0)


# SD v1.4's scheduler config (PNDM, PLMS steps only): ConceptPrune's pipelines sample with it
SD14_PNDM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
# its first 10 U-Net calls at 50 steps (961 twice: PLMS's warm-up repeats it)
CONCEPTPRUNE_TIMESTEPS = [981, 961, 961, 941, 921, 901, 881, 861, 841, 821]


@pytest.mark.parametrize("config", ["sd14_pndm", "ddim_saved"])
def test_wanda_under_pndm_takes_statistics_at_conceptprunes_timesteps(bundle, config):
    """scheduler "pndm" (SD's own config, or a checkpoint saved with DDIM's) with 50 steps: the
    hooked layers see exactly the U-Net calls at t = 981, 961, 961, 941, ..., 821, one statistics
    row each."""
    from diffusers import PNDMScheduler

    if config == "sd14_pndm":
        bundle.scheduler = PNDMScheduler(**SD14_PNDM)
    seen: list[int] = []
    handle = bundle.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1])))
    wanda = get_mitigation("wanda", scheduler="pndm", num_inference_steps=50, timesteps=10, batch_size=8)
    layers = ffn_output_layers(bundle.unet)
    try:
        norms = wanda._column_sq_norms(bundle, layers, PROMPTS[:2], SEEDS[:1])
    finally:
        handle.remove()
    assert seen == CONCEPTPRUNE_TIMESTEPS  # one chunk of 2 jobs: 10 calls
    assert all(v.shape[0] == 10 and bool((v > 0).all()) for v in norms.values())
    settings = SamplerSettings(scheduler="pndm", guidance_scale=3.0, num_inference_steps=4)
    assert sample(bundle, PROMPTS[:1], [0], settings=settings).images.isfinite().all()


def test_wanda_state_round_trip_and_per_prompt(bundle, tmp_path):
    wanda = prepared_wanda(bundle, scope="per_prompt")
    single = wanda.for_prompts(PROMPTS[:1])
    union = wanda.masks()
    for name, index in single.masks().items():
        assert set(index.tolist()) <= set(union[name].tolist())
    path = tmp_path / "wanda.safetensors"
    wanda.save(path)
    loaded = get_mitigation("wanda", **wanda.settings())
    loaded.load(path)
    with applied(wanda, bundle):
        first = unet_state(bundle)
    with applied(loaded, bundle):
        assert not changed_params(first, bundle)
    with pytest.raises(MemtrainError, match="holds the state of mitigation 'wanda'"):
        get_mitigation("nemo").load(path)


def test_apply_twice_is_refused_and_applied_undoes_on_error(bundle):
    wanda = prepared_wanda(bundle, timesteps=1)
    before = unet_state(bundle)
    with pytest.raises(RuntimeError, match="boom"):
        with applied(wanda, bundle):
            with pytest.raises(MemtrainError, match="already applied"):
                wanda.apply(bundle)
            raise RuntimeError("boom")
    assert not changed_params(before, bundle)


# --- search-space ablation (the audit's check for an ineffective pruning mitigation) ------------

@pytest.mark.parametrize("name,suffix,scope", [
    ("nemo", "attn2.to_v", {}), ("nemo", "attn2.to_v", {"layers": "all"}), ("wanda", "ff.net.2", {}),
])
def test_search_space_ablation_zeroes_exactly_the_search_space(bundle, name, suffix, scope):
    from memtrain.mitigations import search_space_ablation

    mitigation = get_mitigation(name, **scope)  # no prepare needed: the search space is structural
    layers = mitigation.search_space(bundle.unet)
    expected = {n for n, m in bundle.unet.named_modules() if n.endswith(suffix)}
    if name == "nemo" and not scope:
        expected = {n for n in expected if not n.startswith("up_blocks")}
    assert set(layers) == expected and expected
    ablation = search_space_ablation(mitigation, bundle.unet)
    before = unet_state(bundle)
    reference = images(bundle)
    with applied(ablation, bundle):
        assert changed_params(before, bundle) == {f"{layer}.weight" for layer in expected}
        assert all(bool((bundle.unet.get_submodule(layer).weight == 0).all()) for layer in expected)
        assert ablation.num_weights(bundle.unet) == sum(before[f"{layer}.weight"].numel() for layer in expected)
        assert not torch.equal(images(bundle), reference)
    assert not changed_params(before, bundle)
    assert torch.equal(images(bundle), reference)


def test_text_path_mitigations_have_no_search_space(bundle):
    from memtrain.mitigations import search_space_ablation

    for name in ("none", "pad_eot", "pad_mask"):
        assert search_space_ablation(get_mitigation(name), bundle.unet) is None


# --- weight checksums ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checksums_see_every_single_bit_flip_and_its_undo(bundle, dtype):
    """weights_checksum (mitigation undo) and param_checksum (rank equality), reduced on the
    weights' device, change when any one bit of a weight flips and are equal again after undo."""
    bundle.unet.to(dtype)
    before, params_before = weights_checksum(bundle), param_checksum(bundle.unet)
    assert weights_checksum(bundle) == before and set(params_before) == {"sha256", "sum"}
    weight = dict(bundle.unet.named_parameters())["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight"]
    raw = weight.data.view(-1).view(torch.uint8)
    size = weight.element_size()
    for element in (0, weight.numel() // 2 + 1, weight.numel() - 1):
        for byte in range(element * size, (element + 1) * size):
            for bit in range(8):  # every bit of the element, sign and exponent included
                raw[byte] ^= 1 << bit
                assert param_checksum(bundle.unet)["sha256"] != params_before["sha256"], (element, byte, bit)
                if bit in (0, 7):  # the whole bundle's digest (slower: the text encoder's table)
                    assert weights_checksum(bundle) != before, (element, byte, bit)
                raw[byte] ^= 1 << bit
        assert weights_checksum(bundle) == before
    assert param_checksum(bundle.unet) == params_before
    # the largest tensor spans many rows of the reduction: a flip in its last word, and a swap
    table = bundle.text_encoder.get_input_embeddings().weight.data.view(-1)
    table.view(torch.uint8)[-1] ^= 128
    assert weights_checksum(bundle) != before
    table.view(torch.uint8)[-1] ^= 128
    assert weights_checksum(bundle) == before
    table[[0, 1]] = table[[1, 0]]
    assert weights_checksum(bundle) != before
