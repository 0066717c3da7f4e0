"""Parallel merge (exact), pruning the widened layer back to size, and its export round trip."""

import json

import pytest
import torch
from conftest import tiny_model
from test_merge_callback import run_validate
from transformers import AutoModelForCausalLM

from lightning_mka.errors import MKAError
from lightning_mka.parallel import (
    GramAccumulator,
    contribution_importance,
    kept_mlp_statistics,
    layer_width,
    parallel_merged_layer,
    prune_attention,
    prune_mlp,
    refit_output,
    refit_residual,
    solve_refit,
    top_units,
)
from lightning_mka.surgery import decoder_stack, parallel_merge_layers


def _randomize_norms(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in decoder_stack(model)[1]:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))


def _layer_inputs(model, batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, model.config.hidden_size, generator=g)
    positions = torch.arange(length).unsqueeze(0).expand(batch, -1)
    position_embeddings = model.model.rotary_emb(h, positions)
    return h, position_embeddings


def _attention(layer, x, pe):
    return layer.self_attn(hidden_states=x, position_embeddings=pe, attention_mask=None)[0]


def _parallel_reference(first, second, h, pe):
    """h + A_l(h) + A_m(h), then + M_l(.) + M_m(.) on that sum, each sub-block with its OWN norm weights."""
    a = _attention(first, first.input_layernorm(h), pe) + _attention(second, second.input_layernorm(h), pe)
    h1 = h + a
    return h1 + first.mlp(first.post_attention_layernorm(h1)) + second.mlp(second.post_attention_layernorm(h1))


def _layer_out(layer, h, pe):
    out = layer(h, position_embeddings=pe, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_parallel_merge_is_exact_and_keeps_gqa_grouping(kind):
    # A larger init than the default 0.02, so that each layer's update is far from negligible.
    extra = {"attention_bias": True} if kind == "llama" else {}
    model = tiny_model(kind, layers=6, initializer_range=0.2, **extra)
    _randomize_norms(model)
    layers = decoder_stack(model)[1]
    first, second = layers[3], layers[4]
    h, pe = _layer_inputs(model)
    with torch.no_grad():
        merged = parallel_merged_layer(first, second)
        expected = _parallel_reference(first, second, h, pe)
        got = _layer_out(merged, h, pe)
        sequential = _layer_out(second, _layer_out(first, h, pe), pe)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, sequential, atol=1e-3)  # it is the parallel form, not the original stack
    width = layer_width(merged)
    config = model.config
    assert width.q_heads == 2 * config.num_attention_heads and width.kv_heads == 2 * config.num_key_value_heads
    assert width.neurons == 2 * config.intermediate_size
    assert merged.self_attn.num_key_value_groups == config.num_attention_heads // config.num_key_value_heads
    assert torch.equal(merged.input_layernorm.weight, torch.ones_like(merged.input_layernorm.weight))


def test_gqa_grouping_matters():
    """Swapping the second layer's KV groups breaks exactness: the construction really pairs each head with its group."""
    model = tiny_model("llama", layers=4, initializer_range=0.2)
    layers = decoder_stack(model)[1]
    h, pe = _layer_inputs(model)
    with torch.no_grad():
        merged = parallel_merged_layer(layers[1], layers[2])
        expected = _parallel_reference(layers[1], layers[2], h, pe)
        hd, nkv = merged.self_attn.head_dim, model.config.num_key_value_heads
        for name in ("k_proj", "v_proj"):
            w = getattr(merged.self_attn, name).weight
            second_half = w[nkv * hd:].clone()
            w[nkv * hd:] = torch.cat([second_half[hd:], second_half[:hd]])
        assert not torch.allclose(_layer_out(merged, h, pe), expected, atol=1e-4)


def test_parallel_merge_in_a_model_keeps_generation_working():
    model = tiny_model("llama", layers=6)
    ids = torch.randint(3, 128, (1, 8))
    parallel_merge_layers(model, 2, 3)
    assert model.config.num_hidden_layers == 5 and len(decoder_stack(model)[1]) == 5
    assert [layer.self_attn.layer_idx for layer in decoder_stack(model)[1]] == list(range(5))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_parallel_merge_refuses_inexact_architectures(kind):
    model = tiny_model(kind, layers=4)
    with pytest.raises(MKAError, match="not exact for model_type"):
        parallel_merge_layers(model, 1, 2)


def test_contribution_importance_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 6, generator=g)
    x = torch.randn(40, 6, generator=g)
    gram = x.double().T @ x.double()
    scores = contribution_importance(w, gram, groups=3)
    for group in range(3):
        cols = slice(2 * group, 2 * group + 2)
        direct = ((x[:, cols] @ w[:, cols].T) ** 2).sum()
        assert abs(float(scores[group]) - float(direct)) < 1e-3 * float(direct)


def _widened_layer_and_grams(seed=0):
    model = tiny_model("llama", layers=4, seed=seed)
    _randomize_norms(model)
    layers = decoder_stack(model)[1]
    merged = parallel_merged_layer(layers[1], layers[2])
    h, pe = _layer_inputs(model, batch=4, length=24)
    return model, merged, h, pe


def _gram_of(module, layer, h, pe):
    acc = GramAccumulator()
    handle = module.register_forward_pre_hook(lambda _m, args: acc.add(args[0]))
    with torch.no_grad():
        _layer_out(layer, h, pe)
    handle.remove()
    return acc.gram


def test_pruning_drops_dead_units_and_refit_brings_the_output_closer():
    model, merged, h, pe = _widened_layer_and_grams()
    with torch.no_grad():
        merged.mlp.down_proj.weight[:, 5] = 0.0  # a neuron that contributes nothing must be pruned
        target = _layer_out(merged, h, pe)
    config = model.config
    errors = {}
    for refit in (False, True):
        layer = parallel_merged_layer(decoder_stack(model)[1][1], decoder_stack(model)[1][2])
        with torch.no_grad():
            layer.mlp.down_proj.weight[:, 5] = 0.0
            groups = prune_attention(layer, config.num_key_value_heads, _gram_of(layer.self_attn.o_proj, layer, h, pe), refit)
            neurons = prune_mlp(layer, config.intermediate_size, _gram_of(layer.mlp.down_proj, layer, h, pe), refit)
            errors[refit] = float((_layer_out(layer, h, pe) - target).pow(2).mean())
        assert len(groups) == config.num_key_value_heads and len(neurons) == config.intermediate_size
        assert 5 not in neurons
        width = layer_width(layer)
        assert (width.q_heads, width.kv_heads, width.neurons) == (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    assert errors[True] < errors[False]


def test_pruning_nothing_with_refit_keeps_the_output():
    model, merged, h, pe = _widened_layer_and_grams()
    with torch.no_grad():
        target = _layer_out(merged, h, pe)
        width = layer_width(merged)
        prune_attention(merged, width.kv_heads, _gram_of(merged.self_attn.o_proj, merged, h, pe), refit=True, ridge=0.0)
        prune_mlp(merged, width.neurons, _gram_of(merged.mlp.down_proj, merged, h, pe), refit=True, ridge=0.0)
        torch.testing.assert_close(_layer_out(merged, h, pe), target, rtol=1e-4, atol=1e-4)


def test_parallel_pruned_run_exports_and_reloads(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    module, _ = run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, merge_operator="parallel_pruned")
    plan = json.loads((tmp_path / "logs" / "version_0" / "merge_plan.json").read_text())["steps"]
    assert [s["operator"] for s in plan] == ["parallel_pruned"] * 3 and all(s["alpha"] is None for s in plan)
    config = module.model.config
    assert all(len(s["kept_kv_groups"]) == config.num_key_value_heads and len(s["kept_neurons"]) == config.intermediate_size for s in plan)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert reloaded.config.num_hidden_layers == 3
    ids = torch.randint(3, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, module.model(ids).logits, rtol=0, atol=1e-5)
        cached = reloaded.generate(ids[:1, :6], max_new_tokens=6, do_sample=False, use_cache=True)
        plain = reloaded.generate(ids[:1, :6], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    # The exported model is the same size as a 3-layer drop: every layer has the config's width again.
    assert all(layer_width(layer).neurons == config.intermediate_size for layer in decoder_stack(reloaded)[1])


def test_parallel_keeps_all_parameters_and_refuses_export(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """Parallel keeps every parameter (depth-only); it cannot be exported and says so."""
    module, _ = run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, export=False, merge_operator="parallel")
    widths = [layer_width(layer).neurons for layer in decoder_stack(module.model)[1]]
    assert len(widths) == 3 and sum(widths) == 6 * module.model.config.intermediate_size
    from lightning_mka.callbacks import MergeCallback

    with pytest.raises(MKAError, match="parallel_pruned to export"):
        MergeCallback(target_layers=3, merge_operator="parallel", export_dir=str(tmp_path / "x"))


def test_refit_towards_the_original_pair_matches_it_better():
    """refit_target original: down_proj is refit so the pruned layer reproduces the two ORIGINAL layers in sequence."""
    import copy

    from lightning_mka.activations import PointSpec
    from lightning_mka.merging import LayerMerger, MergeConfig
    from test_search_verify import batches

    model = tiny_model("llama", layers=6, initializer_range=0.1)
    first, second = decoder_stack(model)[1][2], decoder_stack(model)[1][3]

    def rope(x):
        return model.model.rotary_emb(x, torch.arange(x.shape[1])[None].expand(x.shape[0], -1))

    errors, kept, update = {}, {}, 0.0
    for target in ("widened", "original"):
        config = MergeConfig(merge_operator="parallel_pruned", refit_target=target, refit_ridge=0.0, points=PointSpec("tokens", 64, 0))
        merger = LayerMerger(copy.deepcopy(model), config, batches(), torch.full((8,), 24))
        merger.collector.run(merger.batches())
        kept[target] = merger._apply(2, 3, None, "parallel_pruned")
        merged = decoder_stack(merger.model)[1][2]
        errors[target] = 0.0
        with torch.no_grad():
            for x in merger.collector.inputs[2]:  # the calibration inputs the refit saw
                original = _layer_out(second, _layer_out(first, x, rope(x)), rope(x))
                errors[target] += float((_layer_out(merged, x, rope(x)) - original).pow(2).sum())
                update += float((original - x).pow(2).sum()) / 2
    damage = kept["original"].pop("damage")
    assert kept["widened"].pop("damage") is None
    assert kept["widened"] == kept["original"]  # the same units are kept; only the refit target differs
    assert errors["original"] < errors["widened"]
    # the damage from the refit's statistics is the pruned layer's output error relative to the pair's update
    assert damage == pytest.approx(errors["original"] / update, rel=1e-3)


def test_kept_neuron_statistics_equal_the_full_gram_blocks_without_forming_it():
    """parallel_pruned's lean statistics: neuron scores from the Gram diagonal and G_KK / C_K from down_proj's stored
    inputs equal the blocks of the full (2 x intermediate)^2 Gram matrix the refit used to slice."""
    model, merged, h, pe = _widened_layer_and_grams()
    full = GramAccumulator(torch.float64)
    inputs = []
    handles = [merged.mlp.down_proj.register_forward_pre_hook(lambda _m, args: full.add(args[0])),
               merged.mlp.down_proj.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))]
    with torch.no_grad():
        _layer_out(merged, h, pe)
    for handle in handles:
        handle.remove()
    weight = merged.mlp.down_proj.weight
    n = layer_width(merged).neurons
    torch.testing.assert_close(contribution_importance(weight, full.gram.diagonal(), n), contribution_importance(weight, full.gram, n))
    keep = torch.tensor(top_units(contribution_importance(weight, full.gram.diagonal(), n), n // 2))
    targets = [torch.randn(u.shape[0], weight.shape[0], generator=torch.Generator().manual_seed(1)) for u in inputs]
    gram_kk, cross_k = kept_mlp_statistics(weight, inputs, targets, keep)
    assert gram_kk.shape == (n // 2, n // 2)
    x = torch.cat(inputs).double()
    torch.testing.assert_close(gram_kk.double(), full.gram[keep][:, keep], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(cross_k.double(), x[:, keep].T @ torch.cat(targets).double(), rtol=1e-4, atol=1e-3)
    # widened target: the same refit as slicing the full Gram (the old path), to float32 accumulation tolerance
    gram_kk, cross_k = kept_mlp_statistics(weight, inputs, None, keep)
    torch.testing.assert_close(solve_refit(gram_kk, cross_k, 1e-3), refit_output(weight, full.gram, keep, 1e-3), rtol=1e-3, atol=1e-4)


def test_solve_refit_factors_in_place_and_falls_back_to_lu():
    """The ridge solve holds one float64 (K, K) matrix: the Cholesky factor overwrites the shifted copy and two
    triangular solves read it in place. Bit for bit the numbers of a separate factor + ``cholesky_solve`` (which clones
    the factor); an indefinite system (ridge 0) is rebuilt and solved by LU."""
    torch.manual_seed(0)
    x = torch.randn(300, 200, dtype=torch.float64)
    gram = (x.T @ x).float()
    rhs = torch.randn(200, 48, dtype=torch.float64)
    shifted = gram.double()
    shifted.diagonal().add_(1e-2 * float(shifted.diagonal().mean()))
    assert torch.equal(solve_refit(gram, rhs, 1e-2), torch.cholesky_solve(rhs, torch.linalg.cholesky(shifted)).T)
    torch.testing.assert_close(solve_refit(gram, rhs, 1e-2), torch.linalg.solve(shifted, rhs).T, rtol=1e-9, atol=1e-12)
    indefinite = torch.diag(torch.tensor([3.0, -1.0, 2.0]))  # Cholesky fails at the second pivot, after overwriting
    torch.testing.assert_close(solve_refit(indefinite, torch.ones(3, 2), 0.0), torch.tensor([[1 / 3, -1.0, 0.5]] * 2, dtype=torch.float64))
    assert gram.dtype == torch.float32 and torch.equal(gram, (x.T @ x).float())  # the caller's statistics are untouched


def test_refit_residual_equals_the_residual_summed_over_tokens():
    torch.manual_seed(0)
    x, y, weight = torch.randn(50, 12, dtype=torch.float64), torch.randn(50, 4, dtype=torch.float64), torch.randn(4, 12)
    direct = float((y - x @ weight.double().T).pow(2).sum())
    assert refit_residual(weight, (x.T @ x).float(), (x.T @ y).float(), float(y.pow(2).sum())) == pytest.approx(direct, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_pruning_math_runs_on_the_statistics_device_when_the_weights_rest_on_cpu():
    """Layer-wise execution on a GPU: a merged layer's weights rest on CPU between forwards while the calibration
    statistics are summed on the GPU; scoring and refitting must accept both (they failed with a device mismatch)."""
    torch.manual_seed(0)
    weight = torch.randn(8, 12)
    x = torch.randn(50, 12, device="cuda")
    gram = x.T @ x
    keep = torch.arange(6)
    torch.testing.assert_close(contribution_importance(weight, gram, 4).cpu(), contribution_importance(weight, gram.cpu(), 4))
    torch.testing.assert_close(contribution_importance(weight, gram.diagonal(), 12).cpu(), contribution_importance(weight, gram.diagonal().cpu(), 12))
    torch.testing.assert_close(refit_output(weight, gram, keep, 1e-3).cpu(), refit_output(weight, gram.cpu(), keep, 1e-3), rtol=1e-4, atol=1e-5)
    g, c = kept_mlp_statistics(weight, [x], None, keep)
    g_cpu, c_cpu = kept_mlp_statistics(weight, [x.cpu()], None, keep)
    torch.testing.assert_close(g.cpu(), g_cpu, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(c.cpu(), c_cpu, rtol=1e-4, atol=1e-3)
