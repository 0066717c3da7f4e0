"""MergeCallback end to end on a tiny Llama saved as an HF dir, through Trainer.validate (training-free)."""

import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lightning_mka.callbacks import MergeCallback
from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.errors import MKAError
from lightning_mka.module import MKAModule
from lightning_mka.surgery import decoder_stack


def run_validate(model_dir, corpus, heldout, out, export=True, **merge_kwargs):
    L.seed_everything(0)
    module = MKAModule(model=str(model_dir))
    data = CalibrationDataModule(
        tokenizer=str(model_dir), calibration=str(corpus), calibration_samples=8, seq_len=32, batch_size=4,
        eval_texts=[str(heldout)], eval_samples=4,
    )
    kwargs = dict(target_layers=3, num_points=128, seed=0)
    kwargs.update(merge_kwargs)
    callback = MergeCallback(export_dir=str(out / "export") if export else None, **kwargs)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=L.pytorch.loggers.CSVLogger(out, name="logs"), callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data)
    return module, trainer


def test_recompressing_an_export_records_every_merge_it_holds(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """6 -> 4 layers, exported; that export -> 3: the second export lists all three merges (distillation aligns its
    layers to the dense teacher from this list), and the dense depth they imply is the original 6."""
    from lightning_mka.finetuning import depth_before

    run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "a", target_layers=4)
    first = json.loads((tmp_path / "a" / "export" / "mka_merge_plan.json").read_text())["steps"]
    module, _ = run_validate(tmp_path / "a" / "export", tiny_corpus, tiny_heldout, tmp_path / "b", target_layers=3)
    second = json.loads((tmp_path / "b" / "export" / "mka_merge_plan.json").read_text())["steps"]
    assert len(first) == 2 and len(second) == 3 and second[:2] == first
    assert depth_before(3, second) == 6 and module.source_plan == first and second[2]["pair"] == list(module.merge_plan[0]["pair"])


def test_validate_merges_to_target_and_writes_outputs(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    module, trainer = run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path)
    assert len(decoder_stack(module.model)[1]) == 3
    log_dir = tmp_path / "logs" / "version_0"
    plan = json.loads((log_dir / "merge_plan.json").read_text())
    assert [s["depth_after"] for s in plan["steps"]] == [5, 4, 3]
    for s in plan["steps"]:
        assert 0.05 <= s["alpha"] <= 0.95 and 0.0 <= s["score"] <= 1.0
        assert s["pair"][1] == s["pair"][0] + 1  # adjacent by default
        assert s["pair"][0] >= 1 and s["pair"][1] <= s["depth_after"] - 1  # keep_first / keep_last (depth was depth_after + 1)
    results = json.loads((log_dir / "results.json").read_text())
    assert results["layers_before"] == 6 and results["layers_after"] == 3
    assert results["params_after"] < results["params_before"]
    heldout = f"{tiny_heldout}_ppl"
    assert results["metrics_before"][heldout] > 1 and results["metrics_after"][heldout] > 1
    assert results["metrics_before"][f"{tiny_heldout}_top1_agree"] == 1.0
    assert results["passes"]["full"] == 1 and results["passes"]["suffix"] == 2  # rescoring reran only suffixes
    assert len(list((log_dir / "similarity").glob("step_*.pt"))) == 3
    assert len(list((log_dir / "similarity").glob("step_*.png"))) == 3
    # the export reloads with no missing keys, 3 layers, the same logits
    from transformers import AutoModelForCausalLM

    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.num_hidden_layers == 3
    ids = torch.randint(4, 120, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, module.model(ids).logits)
    assert (tmp_path / "export" / "tokenizer.json").exists()


def test_same_seed_same_plan_and_weights(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "a")
    run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "b")
    plans = [json.loads((tmp_path / d / "logs" / "version_0" / "merge_plan.json").read_text()) for d in "ab"]
    assert plans[0] == plans[1]
    weights = [load_file(tmp_path / d / "export" / "model.safetensors") for d in "ab"]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_mka_picks_a_pair_whose_second_layer_is_a_no_op(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    # Zeroing layer 3's output projections makes it the identity: its output equals layer 2's at every point,
    # so NPIB is exactly 1 for (2, 3) and the first merge must take that pair.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    model.save_pretrained(tiny_model_dir)
    run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, export=False, target_layers=5)
    plan = json.loads((tmp_path / "logs" / "version_0" / "merge_plan.json").read_text())
    assert plan["steps"][0]["pair_original"] == [2, 3]
    assert plan["steps"][0]["score"] == pytest.approx(1.0)


def test_existing_export_dir_is_refused(tmp_path):
    (tmp_path / "export").mkdir()
    with pytest.raises(MKAError, match="already exists; choose a new export_dir or set overwrite: true"):
        MergeCallback(target_layers=3, export_dir=str(tmp_path / "export"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one of target_layers or compression_ratio"),
        (dict(target_layers=3, compression_ratio=0.5), "exactly one of target_layers or compression_ratio"),
        (dict(compression_ratio=1.5), "compression_ratio=1.5 must be in \\(0, 1\\)"),
        (dict(target_layers=0), "target_layers=0 must be >= 1"),
        (dict(target_layers=3, alpha="bogus"), "unknown alpha 'bogus'"),
        (dict(target_layers=3, alpha=1.2), "alpha=1.2 is outside \\[0, 1\\]"),
        (dict(target_layers=3, similarity="dot"), "unknown similarity 'dot'"),
        (dict(target_layers=3, points="first"), "unknown points mode 'first'"),
        (dict(target_layers=3, num_points=7), "num_points=7 is too few"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, message):
    with pytest.raises(MKAError, match=message):
        MergeCallback(**kwargs)


def test_unreachable_target_fails_before_merging(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    with pytest.raises(MKAError, match="target depth 2 is unreachable with keep_first=1 and keep_last=1"):
        run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, target_layers=2)
    with pytest.raises(MKAError, match="target_layers=6 must be below the model's 6 layers"):
        run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path, target_layers=6)


def test_an_export_dir_that_holds_an_input_model_is_refused(tmp_path, monkeypatch):
    """``check_export_dir(..., inputs)``: the export dir may not be, or hold, a model the run reads (a directory or a
    .gguf file), overwrite or not; other dirs, and sources that are not local paths (hub ids, assets), pass."""
    from lightning_mka.assets import CACHE_ENV
    from lightning_mka.export import check_export_dir

    model, gguf = tmp_path / "models" / "student", tmp_path / "ggufs" / "teacher.gguf"
    model.mkdir(parents=True)
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    inputs = (str(model), str(gguf), "org/hub-model", None)
    for target in (model, tmp_path / "models", gguf.parent, tmp_path):
        with pytest.raises(MKAError, match="would replace .*, a model this run reads; choose another export_dir"):
            check_export_dir(target, overwrite=True, inputs=inputs)
    assert check_export_dir(tmp_path / "models" / "other", overwrite=True, inputs=inputs) == tmp_path / "models" / "other"
    assert check_export_dir(model, overwrite=True) == model  # without inputs: the overwrite rule alone
    # through symlinks: a hub snapshot's .gguf links into its blobs; an export dir may itself be a link to the model
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "abc").write_bytes(b"GGUF")
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "m.gguf").symlink_to(tmp_path / "blobs" / "abc")
    (tmp_path / "link-to-student").symlink_to(model)
    for target, source in ((tmp_path / "snapshot", tmp_path / "snapshot" / "m.gguf"), (tmp_path / "link-to-student", model)):
        with pytest.raises(MKAError, match="a model this run reads"):
            check_export_dir(target, overwrite=True, inputs=(str(source),))
    # a model asset by name: its dir in the cache (LIGHTNING_MKA_CACHE here), built or not
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(MKAError, match=r"would replace 'smollm2-135m', a model this run reads"):
        check_export_dir(tmp_path / "cache" / "models" / "smollm2-135m", overwrite=True, inputs=("smollm2-135m",))
