"""selection: damage (the pair whose pruned merge reproduces the two original layers best) and parallel_pruned on
Qwen3 / Gemma3 (first layer's attention, both MLPs, refit towards the originals)."""

import copy

import pytest
import torch

from conftest import tiny_model
from lightning_mka.activations import PointSpec
from lightning_mka.errors import MKAError
from lightning_mka.merging import LayerMerger, MergeConfig
from lightning_mka.surgery import decoder_stack, drop_layers
from test_search_verify import batches


def merger_for(model, **options):
    config = MergeConfig(**{"merge_operator": "parallel_pruned", "points": PointSpec("tokens", 64, 0), **options})
    return LayerMerger(model, config, batches(), torch.full((8,), 24))


def with_similarity(merger, favourite):
    """Score once, then overwrite NPIB's matrix so that ``favourite`` is the most similar pair, (3, 4) the least."""
    similarity = merger.rescore().clone()
    similarity[1:5, 1:5] = 0.5
    similarity[3, 4] = similarity[4, 3] = 0.1
    similarity[favourite] = similarity[favourite[::-1]] = 0.9
    merger.similarity = similarity
    return merger


def test_damage_selection_picks_the_pair_a_merge_reproduces_exactly():
    # Layer 4 is the identity (zero output projections): merging 3+4 in parallel and pruning back keeps exactly
    # layer 3, which reproduces the pair 3 -> 4; every other candidate pair loses something. NPIB's matrix is rigged
    # so that 1+2 looks most similar and 3+4 least: the damage criterion must still pick 3+4 among its 3 candidates.
    model = tiny_model("llama", layers=6, initializer_range=0.1)
    with torch.no_grad():
        decoder_stack(model)[1][4].self_attn.o_proj.weight.zero_()
        decoder_stack(model)[1][4].mlp.down_proj.weight.zero_()
    similarity_choice = with_similarity(merger_for(copy.deepcopy(model)), (1, 2)).step()
    assert similarity_choice.pair == (1, 2)
    top1 = with_similarity(merger_for(copy.deepcopy(model), selection="damage", verify_top=1), (1, 2)).step()
    assert top1.pair == (1, 2)  # with one candidate it is NPIB's choice
    merger = with_similarity(merger_for(copy.deepcopy(model), selection="damage", verify_top=3), (1, 2))
    damages = {}
    for pair in [(1, 2), (2, 3), (3, 4)]:  # the damage of each candidate, measured the same way
        probe = merger_for(copy.deepcopy(model), selection="damage")
        probe.collector.run(probe.batches())
        damages[pair] = probe._apply(*pair, None, "parallel_pruned")["damage"]
    step = merger.step()
    assert step.pair == (3, 4) and step.damage == pytest.approx(damages[(3, 4)])
    assert damages[(3, 4)] < 1e-3 < min(damages[(1, 2)], damages[(2, 3)])
    # the installed layer is the one the selection pruned: same as pruning that pair directly
    reference = merger_for(copy.deepcopy(model))
    reference.collector.run(reference.batches())
    reference._apply(3, 4, None, "parallel_pruned")
    ids = torch.randint(4, 120, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merger.model(ids).logits, reference.model(ids).logits)


def test_damage_selection_needs_the_original_refit():
    with pytest.raises(MKAError, match="selection: damage measures the refit"):
        MergeConfig(selection="damage")
    with pytest.raises(MKAError, match="selection: damage measures the refit"):
        MergeConfig(selection="damage", merge_operator="parallel_pruned", refit_target="widened")


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_parallel_pruned_tracks_the_pair_better_than_dropping_either_layer(kind):
    model = tiny_model(kind, layers=6, initializer_range=0.1)
    merger = merger_for(copy.deepcopy(model))
    merger.collector.run(merger.batches())
    kept = merger._apply(2, 3, None, "parallel_pruned")
    assert len(decoder_stack(merger.model)[1]) == 5 and kept["kept_kv_groups"] == list(range(model.config.num_key_value_heads))
    assert len(kept["kept_neurons"]) == model.config.intermediate_size and max(kept["kept_neurons"]) >= model.config.intermediate_size
    assert decoder_stack(merger.model)[1][2].mlp.down_proj.weight.shape == decoder_stack(model)[1][2].mlp.down_proj.weight.shape
    drop_second, drop_first = copy.deepcopy(model), copy.deepcopy(model)
    drop_layers(drop_second, [3])
    drop_layers(drop_first, [2])

    @torch.no_grad()
    def error(m):  # state after the pair (after its replacement) vs the dense model's, on the calibration batches
        total = 0.0
        for batch in merger.batches():
            want = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[4]
            total += float((m(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[3] - want).pow(2).sum())
        return total

    merged = error(merger.model)
    assert merged < error(drop_second) and merged < error(drop_first)


def test_gemma3_parallel_pruned_keeps_layer_types_exports_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("gemma3", layers=6)
    types = list(model.config.layer_types)
    merger = merger_for(model)
    merger.merge_to(4)
    kept_originals = [origins[0] for origins in merger.origins]
    assert model.config.layer_types == [types[i] for i in kept_originals]
    assert all(s.operator == "parallel_pruned" for s in merger.plan)
    model.save_pretrained(tmp_path / "export")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and reloaded.config.num_hidden_layers == 4
    ids = torch.randint(4, 120, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, model(ids).logits)
        cached = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_parallel_stays_refused_on_qwen3_and_gemma3_but_pruned_is_offered():
    merger_for(tiny_model("qwen3", layers=4))  # parallel_pruned is accepted
    with pytest.raises(MKAError, match="use merge_operator: parallel_pruned, merge_operator: average"):
        LayerMerger(tiny_model("qwen3", layers=4), MergeConfig(merge_operator="parallel", points=PointSpec("tokens", 64, 0)), batches(), torch.full((8,), 24))


def test_cached_pair_output_as_target_equals_running_the_original_pair():
    # Right after a suffix rescoring the cached input of the layer after the pair IS the pair's output: the prune
    # takes it instead of running both layers again, and must come out the same.
    model = tiny_model("llama", layers=6, initializer_range=0.1)
    results = []
    for fresh in (False, True):
        merger = merger_for(copy.deepcopy(model))
        merger.collector.run(merger.batches())
        merger._stale_from = None if fresh else 0
        assert (merger._cached_pair_output(2) is not None) == fresh
        kept = merger._apply(2, 3, None, "parallel_pruned")
        results.append((kept, decoder_stack(merger.model)[1][2].mlp.down_proj.weight.clone()))
    assert results[0][0]["kept_neurons"] == results[1][0]["kept_neurons"]
    assert results[0][0]["damage"] == pytest.approx(results[1][0]["damage"], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_a_pair_merged_without_scoring_is_recorded_and_replays():
    """``LayerMerger.merge``: a pair chosen elsewhere, merged by the configured operator and booked like a scored step
    (no score), before and between scored steps; the plan replays to the same weights (no refit: structure is all)."""
    from lightning_mka.merging import replay_plan

    model = tiny_model("llama", layers=7, initializer_range=0.1)
    merger = merger_for(copy.deepcopy(model), prune_refit=False)
    first = merger.merge(1, 2)
    assert first.score is None and first.pair == (1, 2) and first.merged_original == [1, 2] and first.operator == "parallel_pruned"
    assert first.kept_neurons and merger.depth == 6 == len(decoder_stack(merger.model)[1])
    scored = merger.step()  # the first scoring after a merge it did not score: a full pass over the 6 layers
    assert scored.score is not None and merger.depth == 5 and merger.similarity.shape == (5, 5)
    forced = merger.merge(0, 1)  # after scoring: the cached points and scores follow the new indices
    assert forced.merged_original == sorted(merger.origins[0]) and merger.similarity.shape == (4, 4)
    merger.step()
    assert merger.depth == 3 and sorted(i for group in merger.origins for i in group) == list(range(7))
    replayed = copy.deepcopy(model)
    replay_plan(replayed, [s.to_json() for s in merger.plan])
    ids = torch.randint(4, 120, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(replayed(ids).logits, merger.model(ids).logits)
    with pytest.raises(MKAError, match=r"merge pair \(1, 1\) is not two layers l < m of the current 3"):
        merger.merge(1, 1)


def test_a_merge_without_scoring_prunes_from_current_inputs():
    """Layer ``l``'s cached input is stale after a merge before ``l`` or after training: ``merge`` then prunes (and
    refits) from a fresh pass, exactly as a new merger on the same weights would."""
    model = tiny_model("llama", layers=7, initializer_range=0.1)

    def pruned_by_a_new_merger(weights, l):
        reference = merger_for(copy.deepcopy(weights))
        return reference.merge(l, l + 1), reference.model

    merger = with_similarity(merger_for(copy.deepcopy(model)), (1, 2))
    assert merger.step().pair == (1, 2)
    l = 2  # after the merged layer: its cached input predates that merge
    expected, reference = pruned_by_a_new_merger(merger.model, l)
    step = merger.merge(l, l + 1)
    assert (step.kept_neurons, step.kept_kv_groups) == (expected.kept_neurons, expected.kept_kv_groups)
    ids = torch.randint(4, 120, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merger.model(ids).logits, reference(ids).logits)
        for p in merger.model.parameters():  # "training" between merges
            p.add_(0.02 * torch.randn_like(p))
    merger.invalidate()
    expected, reference = pruned_by_a_new_merger(merger.model, 0)
    step = merger.merge(0, 1)
    assert (step.kept_neurons, step.kept_kv_groups) == (expected.kept_neurons, expected.kept_kv_groups)
    with torch.no_grad():
        torch.testing.assert_close(merger.model(ids).logits, reference(ids).logits)
    assert merger.collector.points == [] and merger.collector.inputs == []  # invalidate freed the stale caches


@pytest.mark.parametrize("kind", ["gemma3", "qwen3"])
def test_a_pair_of_two_layer_types_is_refit_to_each_layers_own_attention(kind):
    """A sliding-window layer merged with a full-attention one (Gemma3, Qwen3): without a cached pair output the refit
    target runs each original with the mask (and rotary embeddings) of its own type. It must equal the cached output
    of the dense pass, and a resumed run (replay on fresh weights) must come out bit-identical."""
    mixed = {"qwen3": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"] * 3}}.get(kind, {})
    model = tiny_model(kind, layers=6, initializer_range=0.1, **mixed)
    types = model.config.layer_types
    l = next(i for i in range(1, 4) if types[i] != types[i + 1])  # a mixed pair off the protected ends
    results = []
    for fresh in (True, False):
        merger = merger_for(copy.deepcopy(model))
        merger.collector.run(merger.batches())
        merger._stale_from = None if fresh else 0
        assert (merger._cached_pair_output(l) is not None) == fresh
        kept = merger._apply(l, l + 1, None, "parallel_pruned")
        results.append((kept, decoder_stack(merger.model)[1][l].mlp.down_proj.weight.clone()))
    assert results[0][0]["kept_neurons"] == results[1][0]["kept_neurons"]
    assert results[0][0]["damage"] == pytest.approx(results[1][0]["damage"], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)

    merged = merger_for(copy.deepcopy(model))
    merged.similarity = merged.rescore().clone().fill_(0.1).fill_diagonal_(1.0)
    merged.similarity[l, l + 1] = merged.similarity[l + 1, l] = 0.9
    assert merged.step().pair == (l, l + 1)
    resumed = merger_for(copy.deepcopy(model))
    resumed.replay([s.to_json() for s in merged.plan])  # raised "pruned differently than recorded" before
    for a, b in zip(merged.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_merges_between_scorings_prune_from_current_inputs_and_replay():
    """``rescore_every: 2``: the second merge is chosen from the old scores, but a merge before its pair changed that
    pair's input since: it prunes from a fresh pass (as a new merger on the same weights would), and the plan replays."""
    model = tiny_model("llama", layers=7, initializer_range=0.1)
    merger = merger_for(copy.deepcopy(model), rescore_every=2)
    similarity = merger.rescore().clone().fill_(0.1).fill_diagonal_(1.0)
    similarity[1, 2] = similarity[2, 1] = 0.9  # first (1, 2), then the original (4, 5): (3, 4) after the first merge
    similarity[4, 5] = similarity[5, 4] = 0.8
    merger.similarity = similarity
    assert merger.step().pair == (1, 2)
    between = copy.deepcopy(merger.model)
    second = merger.step()
    assert second.pair == (3, 4) and not second.rescored
    reference = merger_for(between)
    expected = reference.merge(3, 4)
    assert (second.kept_neurons, second.kept_kv_groups) == (expected.kept_neurons, expected.kept_kv_groups)
    ids = torch.randint(4, 120, (2, 12))
    resumed = merger_for(copy.deepcopy(model), rescore_every=2)
    resumed.replay([s.to_json() for s in merger.plan])  # raised "pruned differently than recorded" before
    with torch.no_grad():
        torch.testing.assert_close(merger.model(ids).logits, reference.model(ids).logits)
        torch.testing.assert_close(resumed.model(ids).logits, merger.model(ids).logits)


@pytest.mark.parametrize("options", [{"rescore_scope": "merged"}, {"rescore_every": 2}, {"rescore_every": 3, "merge_operator": "average"}],
                         ids=["merged-scope", "every-2", "every-3-average"])
def test_a_resume_replays_only_what_it_can_reproduce_and_ends_like_an_uninterrupted_run(options):
    """A killed run resumed from any number of its merges ends with the uninterrupted run's plan and weights, bit for
    bit: the merges a rerun cannot reproduce (after a scoring whose matrix it does not have, or against the dense states
    of ``rescore_scope: merged``) are not replayed but chosen again; replaying them anyway is refused."""
    from lightning_mka.merging import exactly_replayable

    model = tiny_model("llama", layers=7, initializer_range=0.1)
    uninterrupted = merger_for(copy.deepcopy(model), **options)
    uninterrupted.merge_to(3)
    plan = [s.to_json() for s in uninterrupted.plan]
    expected = uninterrupted.model.state_dict()
    counts = []
    for killed_after in range(1, len(plan)):
        resumed = merger_for(copy.deepcopy(model), **options)
        count, reason = exactly_replayable(resumed.config, plan[:killed_after])
        counts.append(count)
        if count < killed_after:
            with pytest.raises(MKAError, match=f"cannot resume from all {killed_after} recorded merges"):
                merger_for(copy.deepcopy(model), **options).replay(plan[:killed_after])
        resumed.replay(plan[:count])
        resumed.merge_to(3)
        assert [s.pair for s in resumed.plan] == [s.pair for s in uninterrupted.plan]
        got = resumed.model.state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), (options, killed_after, count)
    assert counts == {"merged-scope": [0, 0, 0], "every-2": [0, 2, 2], "every-3-average": [0, 0, 3]}[
        "merged-scope" if "rescore_scope" in options else f"every-{options['rescore_every']}" + ("-average" if "merge_operator" in options else "")]


def test_the_nll_check_scores_the_same_sequences_at_every_world_size():
    """``verify_batches`` counts batches of the configured size, by global sequence index: one process and two ranks
    (interleaved shards, each holding fewer sequences than a batch) score the same eight sequences."""
    ids = torch.randint(4, 120, (8, 16), generator=torch.Generator().manual_seed(0))

    def loader(rank, world):
        held = torch.arange(rank, 8, world)
        return lambda: iter([{"input_ids": ids[held], "attention_mask": torch.ones(len(held), 16, dtype=torch.long), "index": held}])

    model = tiny_model("llama", layers=4)
    scored = {}
    for world in (1, 2):
        totals = []
        for rank in range(world):
            sums = []
            config = MergeConfig(points=PointSpec("last"), selection="verify")
            LayerMerger(model, config, loader(rank, world), torch.full((8,), 16), reduce=lambda t: sums.append(t) or t, batch_size=8)._slice_nll(0)
            totals.append(sums[0])
        per_sequence = sum(totals)
        scored[world] = (per_sequence[:, 1] > 0).nonzero().flatten().tolist(), per_sequence
    assert scored[1][0] == scored[2][0] == list(range(8))
    torch.testing.assert_close(scored[1][1], scored[2][1])
