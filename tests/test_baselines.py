import json

import pytest
import torch

from conftest import tiny_model
from lightning_mka.baselines import angular_distances, collect_drop_statistics, select_layers_to_drop
from lightning_mka.errors import MKAError
from lightning_mka.surgery import decoder_stack


def make_identity(model, *layers):
    """Zero the output projections: these layers return their input unchanged."""
    _, stack = decoder_stack(model)
    with torch.no_grad():
        for i in layers:
            stack[i].self_attn.o_proj.weight.zero_()
            stack[i].mlp.down_proj.weight.zero_()
    return model


def batches(n=6, t=24):
    ids = torch.randint(4, 120, (n, t), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids[i : i + 2], "attention_mask": torch.ones(2, t, dtype=torch.long), "index": torch.arange(i, i + 2)} for i in range(0, n, 2)]


def test_block_influence_is_zero_for_an_identity_layer_and_shortgpt_drops_it():
    model = make_identity(tiny_model("llama", layers=6), 3)
    stats = collect_drop_statistics(decoder_stack(model)[0], batches())
    assert stats.block_influence.shape == (6,) and stats.last_states.shape == (7, 6, 32)
    assert float(stats.block_influence[3]) == pytest.approx(0.0, abs=1e-6)
    assert (stats.block_influence[[0, 1, 2, 4, 5]] > 1e-3).all()
    assert select_layers_to_drop("shortgpt", 6, 1, stats) == [3]


def test_angular_drops_the_identity_block():
    model = make_identity(tiny_model("llama", layers=8), 3, 4)
    stats = collect_drop_statistics(decoder_stack(model)[0], batches())
    distances = angular_distances(stats.last_states, 2)
    assert float(distances[3]) == pytest.approx(0.0, abs=1e-4)
    assert select_layers_to_drop("angular", 8, 2, stats) == [3, 4]


def test_tail_and_random():
    assert select_layers_to_drop("tail", 30, 3) == [27, 28, 29]
    picked = select_layers_to_drop("random", 30, 5, seed=7)
    assert picked == select_layers_to_drop("random", 30, 5, seed=7)
    assert picked != select_layers_to_drop("random", 30, 5, seed=8)
    assert len(set(picked)) == 5 and min(picked) >= 1 and max(picked) <= 28


def test_selection_errors():
    with pytest.raises(MKAError, match="unknown method 'laco2'"):
        select_layers_to_drop("laco2", 30, 3)
    with pytest.raises(MKAError, match="cannot drop 30 of 30 layers"):
        select_layers_to_drop("tail", 30, 30)


@pytest.mark.parametrize("method, expected", [("shortgpt", [3]), ("tail", [5]), ("angular", [3])])
def test_method_switch_in_merge_callback(method, expected, tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    from transformers import AutoModelForCausalLM

    from test_merge_callback import run_validate

    model = make_identity(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 3)
    model.save_pretrained(tiny_model_dir)
    module, _ = run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, target_layers=5, method=method)
    plan = json.loads((tmp_path / "logs" / "version_0" / "merge_plan.json").read_text())
    assert plan["method"] == method
    assert plan["steps"][0]["op"] == "drop" and plan["steps"][0]["remove"] == expected
    assert len(decoder_stack(module.model)[1]) == 5
