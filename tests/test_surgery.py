import pytest
import torch

from conftest import ARCHITECTURES, tiny_model
from lightning_mka.errors import MKAError
from lightning_mka.surgery import decoder_stack, drop_layers, merge_layers


def layer_tensors(model, index):
    _, layers = decoder_stack(model)
    return {k: v.detach().clone() for k, v in layers[index].state_dict().items()}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_merge_writes_the_weighted_average_and_deletes_the_other(kind, tmp_path):
    model = tiny_model(kind, layers=6)
    before_l, before_m = layer_tensors(model, 2), layer_tensors(model, 3)
    kept_after = layer_tensors(model, 4)
    layer_types = list(getattr(model.config, "layer_types", []) or [])
    merge_layers(model, keep=2, remove=3, alpha=0.3)
    _, layers = decoder_stack(model)
    assert len(layers) == 5 and model.config.num_hidden_layers == 5
    merged = layer_tensors(model, 2)
    for name, value in merged.items():
        if not value.is_floating_point():
            continue
        expected = 0.3 * before_l[name] + 0.7 * before_m[name]
        torch.testing.assert_close(value, expected)
        if not torch.equal(before_l[name], before_m[name]):  # norms start equal (ones) in random models
            assert not torch.equal(value, before_l[name]) and not torch.equal(value, before_m[name])
    # the layer after the pair moved down by one, untouched
    for name, value in layer_tensors(model, 3).items():
        torch.testing.assert_close(value, kept_after[name])
    # layer_idx follows the new positions; per-layer config lists are sliced by KEPT original indices
    for i, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == i
    if layer_types:
        assert model.config.layer_types == [t for i, t in enumerate(layer_types) if i != 3]


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_merged_model_generates_with_cache_and_round_trips(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(kind, layers=6)
    merge_layers(model, keep=1, remove=2, alpha=0.5)
    drop_layers(model, [3])
    ids = torch.randint(4, 120, (2, 24))
    with torch.no_grad():
        logits = model(ids).logits
        cached = model.generate(ids[:1, :8], max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(ids[:1, :8], max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    model.save_pretrained(tmp_path / "m")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, logits)


def test_unsupported_architecture_names_the_class():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(MKAError, match=r"unsupported architecture GPT2LMHeadModel .*supported model types: llama"):
        merge_layers(model, 0, 1, 0.5)


def test_merge_argument_errors():
    model = tiny_model("llama", layers=4)
    with pytest.raises(MKAError, match="alpha=1.5 must be in"):
        merge_layers(model, 1, 2, 1.5)
    with pytest.raises(MKAError, match="remove=9 is outside"):
        merge_layers(model, 1, 9, 0.5)
    with pytest.raises(MKAError, match="with itself"):
        merge_layers(model, 1, 1, 0.5)


def test_a_token_list_as_long_as_the_stack_is_not_sliced_with_the_layers():
    # Llama-3 style eos_token_id lists: at 3 layers, [2, 7, 9] looks per-layer but is not; layer_types is.
    model = tiny_model("gemma3", layers=3, eos_token_id=[2, 7, 9])
    types = list(model.config.layer_types)
    merge_layers(model, 0, 1, alpha=0.5)
    assert model.config.eos_token_id == [2, 7, 9]
    assert model.config.layer_types == [types[0], types[2]] and model.config.num_hidden_layers == 2
    drop_layers(model, [1])
    assert model.config.eos_token_id == [2, 7, 9] and model.config.layer_types == [types[0]]
