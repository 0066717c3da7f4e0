import pytest
import torch

from conftest import ARCHITECTURES, tiny_model
from lightning_mka.activations import LayerPointCollector, PointSpec, sample_token_positions
from lightning_mka.errors import MKAError
from lightning_mka.surgery import decoder_stack, merge_layers


def batches(n=6, t=20, bs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 120, (n, t), generator=g)
    return [
        {"input_ids": ids[i : i + bs], "attention_mask": torch.ones(min(bs, n - i), t, dtype=torch.long), "index": torch.arange(i, min(i + bs, n))}
        for i in range(0, n, bs)
    ]


def test_positions_exclude_bos_are_distinct_and_seeded():
    lengths = torch.tensor([10, 10, 5, 10])
    pos = sample_token_positions(lengths, 20, seed=3)
    assert pos.shape == (20, 2)
    assert (pos[:, 1] >= 1).all() and (pos[:, 1] < lengths[pos[:, 0]]).all()
    assert len({tuple(p) for p in pos.tolist()}) == 20
    assert torch.equal(pos, sample_token_positions(lengths, 20, seed=3))
    assert not torch.equal(pos, sample_token_positions(lengths, 20, seed=4))
    everything = sample_token_positions(lengths, 31, seed=0)  # 9 + 9 + 4 + 9 usable positions
    assert len(everything) == 31
    with pytest.raises(MKAError, match="num_points=32 exceeds the 31 usable calibration tokens"):
        sample_token_positions(lengths, 32, seed=0)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_points_equal_layer_outputs_from_one_pass(kind):
    model = tiny_model(kind, layers=5)
    base, layers = decoder_stack(model)
    data = batches()
    positions = sample_token_positions(torch.full((6,), 20), 40, seed=0)
    calls = []
    handle = layers[0].register_forward_hook(lambda *a: calls.append(1))
    collector = LayerPointCollector(base, PointSpec("tokens", 40, 0), positions, cache_inputs=False)
    collector.run(data)
    handle.remove()
    assert len(calls) == len(data)  # one pass over the data for all layers, not one per layer
    points = collector.matrix()[:, collector.point_ids.argsort()]
    assert points.shape == (5, 40, 32) and points.dtype == torch.float32
    ids = torch.cat([b["input_ids"] for b in data])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    for layer in range(4):  # the last entry of hidden_states has the final norm applied
        expected = hidden[layer + 1][positions[:, 0], positions[:, 1]]
        torch.testing.assert_close(points[layer], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_last_and_mean_points(mode):
    model = tiny_model("llama", layers=3)
    base, _ = decoder_stack(model)
    data = batches()
    collector = LayerPointCollector(base, PointSpec(mode, 6, 0), None, cache_inputs=False)
    collector.run(data)
    ids = torch.cat([b["input_ids"] for b in data])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1]
    expected = hidden[:, -1] if mode == "last" else hidden.mean(1)
    torch.testing.assert_close(collector.matrix()[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "qwen2"])
def test_suffix_recompute_equals_full_pass_after_merge(kind):
    model = tiny_model(kind, layers=6)
    base, _ = decoder_stack(model)
    data = batches()
    positions = sample_token_positions(torch.full((6,), 20), 50, seed=1)
    spec = PointSpec("tokens", 50, 1)
    cached = LayerPointCollector(base, spec, positions, cache_inputs=True)
    cached.run(data)
    merge_layers(model, keep=3, remove=4, alpha=0.5)
    cached.forget_layer(4)
    cached.run(data, start=3)
    fresh = LayerPointCollector(base, spec, positions, cache_inputs=False)
    fresh.run(data)
    torch.testing.assert_close(cached.matrix(), fresh.matrix(), rtol=1e-5, atol=1e-6)


def test_nan_activations_name_the_layer():
    model = tiny_model("llama", layers=3)
    base, layers = decoder_stack(model)
    with torch.no_grad():
        layers[1].mlp.down_proj.weight.fill_(float("nan"))
    collector = LayerPointCollector(base, PointSpec("last", 6, 0), None, cache_inputs=False)
    with pytest.raises(MKAError, match="decoder layer 1 produced NaN/Inf"):
        collector.run(batches())
