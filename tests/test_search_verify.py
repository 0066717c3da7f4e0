"""alpha: search and selection: verify choose by calibration NLL, computed on the suffix only."""

import copy

import pytest
import torch

from conftest import tiny_model
from lightning_mka.activations import PointSpec
from lightning_mka.errors import MKAError
from lightning_mka.evaluation import shifted_token_nll
from lightning_mka.merging import LayerMerger, MergeConfig
from lightning_mka.planning import candidate_pairs
from lightning_mka.surgery import decoder_stack, merge_layers, merged_temporarily


def batches(n=8, t=24):
    ids = torch.randint(4, 120, (n, t), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i : i + 4], "attention_mask": torch.ones(4, t, dtype=torch.long), "index": torch.arange(i, i + 4)} for i in range(0, n, 4)]
    return lambda: iter(data)


def full_nll(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    nll, count, _ = shifted_token_nll(logits, batch["input_ids"])
    return float(nll) / count


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_merged_temporarily_restores_everything(kind):
    model = tiny_model(kind, layers=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    with merged_temporarily(model, 1, 2, 0.3):
        assert len(decoder_stack(model)[1]) == 4
    assert model.config.to_dict() == config_before
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [l.self_attn.layer_idx for l in decoder_stack(model)[1]] == list(range(5))


@pytest.mark.parametrize("selection", ["similarity", "verify"])
def test_search_picks_the_lowest_nll_option_exactly(selection):
    model = tiny_model("llama", layers=6)
    grid = (1.0, 0.5, 0.0)
    config = MergeConfig(alpha="search", selection=selection, verify_top=3, alpha_grid=grid, points=PointSpec("tokens", 64, 0))
    data = batches()
    dense = copy.deepcopy(model)
    merger = LayerMerger(model, config, data, torch.full((8,), 24))
    similarity = merger.rescore()
    step = merger.step()
    ranked = sorted(candidate_pairs(6, 1, 1, 1), key=lambda p: (-float(similarity[p]), p))
    pool = ranked[:3] if selection == "verify" else ranked[:1]
    first_batch = next(data())
    brute = {}
    for pair in pool:
        for a in grid:
            trial = copy.deepcopy(dense)
            merge_layers(trial, *pair, a)
            brute[(pair, a)] = full_nll(trial, first_batch)
    best = min(brute, key=brute.get)
    assert (step.pair, step.alpha) == best
    assert step.calibration_nll == pytest.approx(brute[best], abs=1e-5)


def test_search_keeps_an_identity_layer_dropped_not_averaged():
    # Layer 3 is the identity: a = 1 on (2, 3) removes it and leaves the function unchanged, the best possible merge.
    model = tiny_model("llama", layers=6)
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    data = batches()
    dense_nll = full_nll(model, next(data()))
    merger = LayerMerger(model, MergeConfig(alpha="search", points=PointSpec("tokens", 64, 0)), data, torch.full((8,), 24))
    step = merger.step()
    assert step.pair_original == (2, 3) and step.alpha == 1.0
    assert step.calibration_nll == pytest.approx(dense_nll, abs=1e-5)


def test_search_needs_fresh_inputs():
    with pytest.raises(MKAError, match="use rescore_every: 1 and cache_inputs: true"):
        MergeConfig(alpha="search", rescore_every=2)
    with pytest.raises(MKAError, match="unknown selection 'greedy'"):
        MergeConfig(selection="greedy")


def test_rescore_scope_merged_recomputes_only_the_merged_layer():
    """``merged`` scope: the merged layer's points are exact, later layers keep their previous points."""
    exact_model, approx_model = tiny_model("llama", layers=6), tiny_model("llama", layers=6)
    lengths = torch.full((8,), 24)
    points = PointSpec("tokens", 64, 0)
    exact = LayerMerger(exact_model, MergeConfig(points=points), batches(), lengths)
    approx = LayerMerger(approx_model, MergeConfig(points=points, rescore_scope="merged"), batches(), lengths)
    for merger in (exact, approx):
        merger.step()
        merger.rescore()
    l = exact.plan[0].pair[0]
    assert approx.plan[0].pair == exact.plan[0].pair
    assert torch.equal(approx.collector.points[l], exact.collector.points[l])  # the merged layer: recomputed
    assert not torch.equal(approx.collector.points[l + 1], exact.collector.points[l + 1])  # stale downstream
    assert approx.stats.layer_evaluations == 6 + 1 and exact.stats.layer_evaluations == 6 + (5 - l)


def test_parallel_pruned_search_also_tries_drops():
    """alpha: search with parallel_pruned: the lowest calibration NLL among {parallel_pruned, drop m, drop l}."""
    model = tiny_model("llama", layers=6)
    config = MergeConfig(alpha="search", merge_operator="parallel_pruned", points=PointSpec("tokens", 64, 0))
    data = batches()
    merger = LayerMerger(copy.deepcopy(model), config, data, torch.full((8,), 24))
    merger.rescore()
    l, m = max(candidate_pairs(6, 1, 1, 1), key=lambda p: (float(merger.similarity[p]), -p[0]))
    nll = {}
    for option, alpha in (("parallel_pruned", None), ("average", 1.0), ("average", 0.0)):
        trial = LayerMerger(copy.deepcopy(model), MergeConfig(merge_operator="parallel_pruned", points=PointSpec("tokens", 64, 0)), data, torch.full((8,), 24))
        trial.rescore()
        trial._apply(l, m, alpha, option)
        nll[(option, alpha)] = full_nll(trial.model, next(data()))
    step = merger.step()
    best = min(nll, key=nll.get)
    assert (step.operator, step.alpha) == best and step.pair == (l, m)
    assert step.calibration_nll == pytest.approx(nll[best], abs=1e-5)
