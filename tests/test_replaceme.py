"""ReplaceMe: the least-squares transform, its fold into down_proj, the callback and the export."""

import copy
import json

import pytest
import torch

from conftest import tiny_model
from lightning_mka.baselines import collect_drop_statistics, select_layers_to_drop
from lightning_mka.replaceme import collect_transform_statistics, fold_transform, least_squares_transform, replace_block
from lightning_mka.surgery import decoder_stack, drop_layers


def batches(n=8, t=24, seed=0):
    ids = torch.randint(4, 120, (n, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, -5:] = 0  # some padding: it must not enter the statistics
    return [{"input_ids": ids[i : i + 4], "attention_mask": mask[i : i + 4], "index": torch.arange(i, i + 4)} for i in range(0, n, 4)]


@torch.no_grad()
def branch_and_target(model, start, end, data):
    """Explicitly, without the module's hooks: the MLP output B of layer start-1 and D = y_out - (y_in - B)."""
    layers = decoder_stack(model)[1]
    box = {}
    handle = layers[start - 1].mlp.register_forward_hook(lambda _m, _a, out: box.update(b=out))
    xs, ys = [], []
    for batch in data:
        hs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
        keep = batch["attention_mask"].reshape(-1).bool()
        b = box["b"].reshape(-1, box["b"].shape[-1])[keep]
        y_in, y_out = hs[start].reshape(-1, b.shape[-1])[keep], hs[end].reshape(-1, b.shape[-1])[keep]
        xs.append(b.double())
        ys.append((y_out - (y_in - b)).double())
    handle.remove()
    return torch.cat(xs), torch.cat(ys)


def test_transform_is_the_least_squares_solution():
    model = tiny_model("llama", layers=6)
    data = batches()
    stats = collect_transform_statistics(decoder_stack(model)[0], 2, 4, data)
    b, d = branch_and_target(model, 2, 4, data)
    assert stats.tokens == b.shape[0] == 8 * 24 - 5  # padding excluded
    transform = least_squares_transform(stats.gram, stats.cross)
    expected = torch.linalg.lstsq(b, d).solution
    torch.testing.assert_close(transform, expected, rtol=1e-6, atol=1e-8)
    # and it is better than no transform (T = I: just dropping the block)
    assert (b @ transform - d).norm() < (b - d).norm()


def test_folded_model_equals_running_the_transform_explicitly():
    model = tiny_model("llama", layers=6)
    data = batches()
    replaced = copy.deepcopy(model)
    record = replace_block(replaced, 2, 4, data)
    assert len(decoder_stack(replaced)[1]) == 4 and replaced.config.num_hidden_layers == 4
    assert record["transform_layer"] == 1 and 0.0 < record["relative_residual"] < 1.0
    # reference: the original weights, the block dropped, and the MLP output of layer 1 multiplied by T at run time
    stats = collect_transform_statistics(decoder_stack(model)[0], 2, 4, data)
    transform = least_squares_transform(stats.gram, stats.cross).float()
    reference = copy.deepcopy(model)
    drop_layers(reference, [2, 3])
    handle = decoder_stack(reference)[1][1].mlp.register_forward_hook(lambda _m, _a, out: out @ transform)
    ids = torch.randint(4, 120, (2, 20))
    with torch.no_grad():
        want = reference(ids).logits
        handle.remove()
        got = replaced(ids).logits
        plain = reference(ids).logits  # the block dropped without the transform
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])
def test_replacement_tracks_the_block_output_better_than_dropping(kind):
    # On calibration tokens the state after the replaced block is closer to the dense model's than after a drop,
    # also for Gemma 3 (MLP output normed before the residual add: transform before the norm, scale refitted).
    model = tiny_model(kind, layers=6)
    data = batches()

    @torch.no_grad()
    def error(m):
        total = 0.0
        for batch in data:
            ref = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states[4]
            got = m(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states[2]
            keep = batch["attention_mask"].bool()
            total += float((got - ref)[keep].pow(2).sum())
        return total

    dropped, replaced = copy.deepcopy(model), copy.deepcopy(model)
    drop_layers(dropped, [2, 3])
    replace_block(replaced, 2, 4, data)
    assert error(replaced) < 0.9 * error(dropped)


def test_replaceme_chooses_the_angular_block_but_never_from_layer_0():
    model = tiny_model("llama", layers=6)
    stats = collect_drop_statistics(decoder_stack(model)[0], batches())
    assert select_layers_to_drop("replaceme", 6, 2, stats) == select_layers_to_drop("angular", 6, 2, stats)
    assert select_layers_to_drop("replaceme", 6, 2, stats, keep_first=0)[0] >= 1


def test_fold_transform_with_bias():
    lin = torch.nn.Linear(5, 3, bias=True)
    transform = torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(7, 5)
    want = lin(x).double() @ transform
    fold_transform(lin, transform)
    torch.testing.assert_close(lin(x).double(), want, rtol=1e-5, atol=1e-5)


def test_replaceme_through_the_callback_exports_and_reloads(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    from transformers import AutoModelForCausalLM

    from test_merge_callback import run_validate

    module, _ = run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, target_layers=4, method="replaceme")
    plan = json.loads((tmp_path / "logs" / "version_0" / "merge_plan.json").read_text())
    step = plan["steps"][0]
    assert plan["method"] == "replaceme" and step["op"] == "drop" and len(step["remove"]) == 2
    assert step["transform_layer"] == step["remove"][0] - 1 >= 0
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    kept = decoder_stack(module.model)[1][step["transform_layer"]].mlp.down_proj.weight
    original = decoder_stack(dense)[1][step["transform_layer"]].mlp.down_proj.weight
    assert not torch.allclose(kept, original)  # the transform was folded in
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and reloaded.config.num_hidden_layers == 4
    ids = torch.randint(4, 120, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, module.model(ids).logits)
