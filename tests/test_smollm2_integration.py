"""Integration tests on the real SmolLM2-135M from the asset cache (marked slow; they run in CI)."""

import json

import pytest
import torch
from conftest import smollm2_merge

from lightning_mka.module import MKAModule
from lightning_mka.surgery import decoder_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, smollm2_dir):
    """SmolLM2 30 -> 28 layers, training-free, on a small calibration set, exported."""
    out = tmp_path_factory.mktemp("smollm2")
    return smollm2_merge(out, target_layers=28, num_points=512), out


def test_dense_smollm2_loads_from_the_asset_cache(smollm2_dir):
    module = MKAModule(model="smollm2-135m")
    assert type(module.model).__name__ == "LlamaForCausalLM"
    assert len(decoder_stack(module.model)[1]) == 30
    assert module.model.config.num_key_value_heads == 3 and module.model.config.num_attention_heads == 9


def test_merge_on_smollm2_exports_a_model_that_reloads_and_generates(compressed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module, out = compressed
    results = json.loads((out / "logs" / "version_0" / "results.json").read_text())
    assert results["layers_before"] == 30 and results["layers_after"] == 28
    before, after = results["metrics_before"]["wiki_ppl"], results["metrics_after"]["wiki_ppl"]
    assert 5 < before < 60, before  # a working dense model on held-out Wikipedia
    assert after > before * 0.9  # removing layers does not make it better by magic
    model, info = AutoModelForCausalLM.from_pretrained(out / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 28
    tokenizer = AutoTokenizer.from_pretrained(out / "export")
    ids = tokenizer("The history of the Roman Empire", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, module.model(ids).logits, rtol=1e-4, atol=1e-4)
        cached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
        plain = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_parallel_pruned_on_smollm2_keeps_gqa_widths_and_round_trips(tmp_path, smollm2_dir):
    """One parallel_pruned merge on the real model (9 query / 3 KV heads): standard widths, reload, same logits."""
    from transformers import AutoModelForCausalLM

    module = smollm2_merge(tmp_path, target_layers=29, num_points=512, merge_callback={"merge_operator": "parallel_pruned"})
    results = json.loads((tmp_path / "logs" / "version_0" / "results.json").read_text())
    step = results["merge_plan"][0]
    assert step["operator"] == "parallel_pruned" and len(step["kept_kv_groups"]) == 3 and len(step["kept_neurons"]) == 1536
    assert results["metrics_after"]["wiki_ppl"] < 2 * results["metrics_before"]["wiki_ppl"]  # one merge: still a working model
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    merged = decoder_stack(model)[1][step["pair"][0]]
    assert merged.self_attn.q_proj.out_features == 9 * 64 and merged.self_attn.k_proj.out_features == 3 * 64
    ids = torch.randint(100, 5000, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, module.model(ids).logits, rtol=1e-4, atol=1e-4)
        cached = model.generate(ids[:, :8], max_new_tokens=10, do_sample=False, use_cache=True)
        plain = model.generate(ids[:, :8], max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
