"""Quantization after merging: int8 / nf4 through bitsandbytes on CPU, measured and exported.

bitsandbytes takes one of two CPU paths for nf4: on CPUs with AVX512-BF16 it repacks the 4-bit weights for a fused
kernel on the first inference forward (which needs widths that are multiples of 64 in and 32 out); elsewhere it
dequantizes. Its switch is ``bitsandbytes.nn.modules.has_avx512bf16`` (read when each ``Linear4bit`` is built), so
the ``cpu_layout`` fixture runs a test on both paths where the CPU allows: ``unpacked`` is forced everywhere by
patching that switch; ``packed`` needs the CPU's kernel and is skipped without it, while the packing rules themselves
are checked against bitsandbytes' conversion on every machine (``test_packed_layout_rule_matches_bitsandbytes``).
"""

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from lightning_mka.callbacks import MergeCallback, QuantizeCallback
from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.errors import MKAError
from lightning_mka.module import MKAModule
from lightning_mka.quantization import check_quantizable, cpu_packs_4bit_weights, fits_packed_4bit, load_quantized, quantized_linear_shapes
from lightning_mka.surgery import num_layers


def _native_packing() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@pytest.fixture(params=["packed", "unpacked"])
def cpu_layout(request, monkeypatch) -> str:
    import bitsandbytes.nn.modules as bnb_modules

    if request.param == "packed" and not _native_packing():
        pytest.skip("this CPU lacks AVX512-BF16, so bitsandbytes has no packed 4-bit kernel to run")
    if request.param == "unpacked":
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    assert cpu_packs_4bit_weights() == (request.param == "packed")
    return request.param


@pytest.fixture
def force_packing(monkeypatch):
    """Make bitsandbytes (and so our check) decide for the packed layout, on any CPU: only for tests that stop
    before a 4-bit kernel runs."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def save_model(path, hidden=64, intermediate=128, layers=6):
    tiny_model("llama", layers=layers, hidden_size=hidden, intermediate_size=intermediate, head_dim=hidden // 4).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def quant_model_dir(tmp_path):
    """A tiny Llama whose widths (64 / 128) every bitsandbytes CPU kernel accepts."""
    return save_model(tmp_path / "tiny-llama-64")


def trainer(tmp_path, callbacks, **kwargs):
    return L.Trainer(accelerator="cpu", callbacks=callbacks, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"),
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_quantize_after_merging_exports_reloadable_smaller_models(cpu_layout, quant_model_dir, tiny_corpus, tiny_heldout, tmp_path, capsys):
    L.seed_everything(0)
    module = MKAModule(model=str(quant_model_dir))
    data = CalibrationDataModule(tokenizer=str(quant_model_dir), calibration=str(tiny_corpus), calibration_samples=8, seq_len=32,
                                 batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4)
    merge = MergeCallback(target_layers=4, num_points=128, export_dir=str(tmp_path / "merged"))
    quantize = QuantizeCallback(modes=["int8", "nf4"])
    trainer(tmp_path, [merge, quantize]).validate(module, datamodule=data)
    results = json.loads((tmp_path / "logs" / "version_0" / "quantization.json").read_text())
    name = f"{tiny_heldout}_ppl"
    float_ppl = results["float"]["metrics"][name]
    # printed last, after Lightning's own table: the comparison, with a column per quantized model
    out = capsys.readouterr().out.strip().splitlines()
    header = max(i for i, line in enumerate(out) if line.startswith("metric "))
    assert out[header].split() == ["metric", "dense", "compressed", "int8", "nf4"] and header > max(
        (i for i, line in enumerate(out) if "Validate metric" in line), default=-1)
    ppl_row = next(line.split() for line in out[header:] if line.startswith(name))
    assert ppl_row[2:] == [f"{float_ppl:.4g}", f"{results['int8']['metrics'][name]:.4g}", f"{results['nf4']['metrics'][name]:.4g}"]
    for mode in ("int8", "nf4"):
        entry = results[mode]
        assert entry["bytes_on_disk"] < results["float"]["bytes_on_disk"]
        assert entry["bytes_in_memory"] < results["float"]["bytes_in_memory"]
        assert abs(entry["metrics"][name] - float_ppl) / float_ppl < 0.2  # close to the float merged model, not equal
        reloaded = load_quantized(tmp_path / f"merged-{mode}", mode)
        assert reloaded.config.num_hidden_layers == 4 and "quantization_config" in reloaded.config.to_dict()
        fresh = load_quantized(tmp_path / "merged", mode)
        ids = torch.randint(3, 100, (1, 12))
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, fresh(ids).logits)


def test_nf4_runs_on_each_cpu_layout(cpu_layout, quant_model_dir, tmp_path):
    """The layout bitsandbytes took is the one the fixture chose; logits stay close to float; an export reloads to the
    same logits."""
    from bitsandbytes.nn import Linear4bit

    float_model = tiny_model("llama", layers=6, hidden_size=64, intermediate_size=128, head_dim=16)
    model = load_quantized(quant_model_dir, "nf4")
    model.save_pretrained(tmp_path / "nf4")  # before the first forward, as QuantizeCallback exports
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
        reference = float_model(ids).logits
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 6 * 7  # q k v o gate up down in every layer; lm_head (tied) stays float
    packed = {bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers}
    assert packed == {cpu_layout == "packed"}
    assert (logits - reference).abs().max() < 0.25 * reference.abs().max()
    reloaded = load_quantized(tmp_path / "nf4", "nf4")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits)


@pytest.mark.parametrize("width_in, width_out", [(64, 32), (128, 96), (64, 64), (32, 32), (96, 64), (64, 48), (64, 100), (192, 576)])
def test_packed_layout_rule_matches_bitsandbytes(width_in, width_out):
    """Our rule agrees with bitsandbytes' own repacking of a really quantized weight (runs on every CPU)."""
    import bitsandbytes.functional as F

    weight = torch.randn(width_out, width_in)
    qweight, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    try:
        F._convert_weight_packed_for_cpu(qweight, state)
        converts = True
    except (RuntimeError, AssertionError):
        converts = False
    assert fits_packed_4bit(width_in, width_out) == converts


def test_odd_width_nf4_is_refused_before_any_work(force_packing, tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    L.seed_everything(0)
    module = MKAModule(model=str(tiny_model_dir))  # hidden size 32
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=8, seq_len=32,
                                 batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4)
    merge = MergeCallback(target_layers=4, num_points=128, export_dir=str(tmp_path / "merged"))
    quantize = QuantizeCallback(modes=["int8", "nf4"])
    with pytest.raises(MKAError) as caught:
        trainer(tmp_path, [merge, quantize]).validate(module, datamodule=data)
    message = str(caught.value)
    assert "\n" not in message
    assert "model.layers.0.self_attn.q_proj is 32 -> 32" in message and "multiple of 64" in message and "multiple of 32" in message
    assert "modes: [int8]" in message and "skip_modules" in message
    assert module.last_metrics == {} and num_layers(module.model) == 6  # no validation, no merge
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged-int8").exists()
    with pytest.raises(MKAError, match="q_proj is 32 -> 32"):
        load_quantized(tiny_model_dir, "nf4")


def test_width_check_follows_the_mode_and_the_layout(monkeypatch, tmp_path):
    import bitsandbytes.nn.modules as bnb_modules

    narrow = tiny_model("llama", layers=2)  # 32 wide
    odd_mlp = save_model(tmp_path / "odd-mlp", hidden=64, intermediate=96, layers=2)  # down_proj takes 96 inputs
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    check_quantizable(narrow, "int8")  # LLM.int8 on CPU takes any width
    check_quantizable(narrow, "nf4", device="cuda")  # the packed layout is CPU-only
    with pytest.raises(MKAError, match=r"model\.layers\.0\.mlp\.down_proj is 96 -> 64.*skip_modules \(e\.g\. \[down_proj\]\)"):
        load_quantized(odd_mlp, "nf4")
    shapes = quantized_linear_shapes(narrow)
    assert "lm_head" not in {name for name, _, _ in shapes} and len(shapes) == 2 * 7
    assert "model.layers.1.mlp.down_proj" not in {name for name, _, _ in quantized_linear_shapes(narrow, ["down_proj"])}
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    check_quantizable(narrow, "nf4")  # unpacked nf4 takes any width


def test_skip_modules_keeps_the_misfit_layers_in_float(tmp_path):
    from bitsandbytes.nn import Linear4bit

    odd_mlp = save_model(tmp_path / "odd-mlp", hidden=64, intermediate=96, layers=2)
    model = load_quantized(odd_mlp, "nf4", skip_modules=["down_proj"])  # runs on this CPU's own layout
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit) and type(model.lm_head) is torch.nn.Linear
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 100, (1, 8))).logits).all()


def test_quantization_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(MKAError, match="quantization nf4 needs bitsandbytes.*pip install bitsandbytes"):
        QuantizeCallback(modes=["nf4"])


def test_unknown_quantization_mode():
    with pytest.raises(MKAError, match="unknown quantization 'int4'"):
        QuantizeCallback(modes=["int4"])


def test_quantize_after_healing_in_fit(quant_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    L.seed_everything(0)
    module = MKAModule(model=str(quant_model_dir), learning_rate=1e-3)
    data = CalibrationDataModule(tokenizer=str(quant_model_dir), calibration=str(tiny_corpus), calibration_samples=8, train_samples=8,
                                 seq_len=32, batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4)
    merge = MergeCallback(target_layers=5, num_points=128, export_dir=str(tmp_path / "healed"))
    quantize = QuantizeCallback(modes=["nf4"])
    trainer(tmp_path, [merge, quantize], max_epochs=2, enable_checkpointing=False, num_sanity_val_steps=-1).fit(module, datamodule=data)
    results = json.loads((tmp_path / "logs" / "version_0" / "quantization.json").read_text())
    name = f"{tiny_heldout}_ppl"
    assert results["float"]["metrics"][name] == module.last_metrics[name]  # the healed model's final validation
    assert name in results["nf4"]["metrics"] and (tmp_path / "healed-nf4" / "config.json").exists()


def test_quantize_a_disk_offloaded_model_without_a_merge(quant_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """No merge export to quantize from: the in-memory model is saved first, through the executor that holds its
    weights on disk (the module's own tensors are placeholders)."""
    module = MKAModule(model=str(quant_model_dir), execution="layerwise", offload="disk", offload_dir=str(tmp_path / "scratch"))
    data = CalibrationDataModule(tokenizer=str(quant_model_dir), calibration=str(tiny_corpus), calibration_samples=4, seq_len=32,
                                 batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4)
    trainer(tmp_path, [QuantizeCallback(modes=["int8"])]).validate(module, datamodule=data)
    results = json.loads((tmp_path / "logs" / "version_0" / "quantization.json").read_text())
    name = f"{tiny_heldout}_ppl"
    assert results["source"] == "in-memory model"
    assert abs(results["int8"]["metrics"][name] - results["float"]["metrics"][name]) / results["float"]["metrics"][name] < 0.2


def test_quantize_export_dir_takes_only_the_mode_placeholder():
    for bad in ("exports/{model}-{layers}L-{mode}", "exports/{mode", "exports/{mode!r}", "exports/{}"):
        with pytest.raises(MKAError, match="has braces other than the placeholder \\{mode\\}; use \\{mode\\} only"):
            QuantizeCallback(modes=["int8"], export_dir=bad)
    assert QuantizeCallback(modes=["int8", "nf4"], export_dir="exports/q-{mode}").export_dir == "exports/q-{mode}"


def test_quantize_uses_this_runs_export_only_and_cleans_its_float_copy(quant_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """A fit whose merges never ran (no validation) has no merged export of its own: a model left at the export path
    by an earlier run is not quantized in its place (a warning says the quantized models are not exported); the
    in-memory model is, from a float copy in the run dir that is named after this process and removed, and a copy a
    killed run left there is removed too."""
    import subprocess

    from lightning_mka.callbacks.quantize import QUANTIZE_TEMP_PREFIX

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (run_dir / f"{QUANTIZE_TEMP_PREFIX}pid{dead}-left").mkdir()  # a SIGKILLed run's copy
    earlier = tmp_path / "merged"
    tiny_model("llama", layers=2, hidden_size=64, intermediate_size=128).save_pretrained(earlier)  # another model
    module = MKAModule(model=str(quant_model_dir), learning_rate=1e-3)
    data = CalibrationDataModule(tokenizer=str(quant_model_dir), calibration=str(tiny_corpus), calibration_samples=8, train_samples=8,
                                 seq_len=32, batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4)
    merge = MergeCallback(target_layers=5, num_points=128, export_dir=str(earlier), overwrite=True)
    with pytest.warns(UserWarning, match="the MergeCallback wrote no export in this run"):
        L.Trainer(accelerator="cpu", callbacks=[merge, QuantizeCallback(modes=["int8"])], logger=False, default_root_dir=run_dir, max_steps=1,
                  num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(module, datamodule=data)
    results = json.loads((run_dir / "quantization.json").read_text())
    assert results["source"] == "in-memory model" and results["int8"]["bytes_in_memory"] > 0
    assert not (tmp_path / "merged-int8").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["quantization.json"]


def test_a_failed_save_of_the_float_copy_is_one_line_and_leaves_nothing(quant_model_dir, tiny_corpus, tiny_heldout, tmp_path, monkeypatch):
    import errno

    class FullDisk:
        def save_pretrained(self, path):
            (Path(path) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_mka.callbacks.quantize.executor_of", lambda model: FullDisk())
    module = MKAModule(model=str(quant_model_dir))
    data = CalibrationDataModule(tokenizer=str(quant_model_dir), calibration=str(tiny_corpus), calibration_samples=4, seq_len=32,
                                 batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4)
    run_dir = tmp_path / "run"
    with pytest.raises(MKAError, match=r"could not save the model to quantize in '.*run' \(No space left on device\); free space"):
        L.Trainer(accelerator="cpu", callbacks=[QuantizeCallback(modes=["int8"])], logger=False, default_root_dir=run_dir,
                  enable_progress_bar=False, enable_model_summary=False).validate(module, datamodule=data)
    assert list(run_dir.iterdir()) == []


def test_validate_from_a_compressed_checkpoint_reports_exports_and_quantizes_it(quant_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """``validate --ckpt_path`` of a finished merge-and-heal: nothing is left to merge, yet the run measures, exports and
    quantizes that model (it used to evaluate it and silently do nothing else)."""
    def data(**kwargs):
        return CalibrationDataModule(tokenizer=str(quant_model_dir), calibration=str(tiny_corpus), calibration_samples=8, seq_len=32,
                                     batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4, **kwargs)

    L.seed_everything(0)
    fitted = MKAModule(model=str(quant_model_dir), learning_rate=1e-3)
    fit = trainer(tmp_path / "fit", [MergeCallback(target_layers=4, num_points=128)], max_epochs=2, num_sanity_val_steps=-1)
    fit.fit(fitted, datamodule=data(train_samples=8))
    checkpoint = fit.checkpoint_callback.best_model_path
    dense = fit.callbacks[0]._before

    module = MKAModule(model=str(quant_model_dir))
    merge = MergeCallback(target_layers=4, num_points=128, export_dir=str(tmp_path / "export"))
    trainer(tmp_path, [merge, QuantizeCallback(modes=["int8"])]).validate(module, datamodule=data(), ckpt_path=checkpoint)
    name = f"{tiny_heldout}_ppl"
    results = json.loads((tmp_path / "logs" / "version_0" / "results.json").read_text())
    assert results["layers_after"] == num_layers(module.model) == 4 and len(results["merge_plan"]) == 2
    assert results["metrics_before"] == dense and results["metrics_after"][name] == module.last_metrics[name]
    assert results["metrics_before"][name] != results["metrics_after"][name]  # the dense model's, not the restored one's
    exported = MKAModule(model=str(tmp_path / "export")).model
    assert num_layers(exported) == 4
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), module.model.state_dict().values()))
    quantized = json.loads((tmp_path / "logs" / "version_0" / "quantization.json").read_text())
    assert name in quantized["int8"]["metrics"] and (tmp_path / "export-int8" / "config.json").exists()


def test_validate_from_a_lora_checkpoint_exports_folded_weights(quant_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    """The export of a LoRA heal's checkpoint holds plain weights, as fit's own export does: adapters folded, nothing
    that from_pretrained would report missing and initialize at random."""
    from safetensors.torch import load_file

    def data(**kwargs):
        return CalibrationDataModule(tokenizer=str(quant_model_dir), calibration=str(tiny_corpus), calibration_samples=8, seq_len=32,
                                     batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4, **kwargs)

    L.seed_everything(0)
    fit = trainer(tmp_path / "fit", [MergeCallback(target_layers=4, num_points=128)], max_epochs=1, num_sanity_val_steps=-1)
    fit.fit(MKAModule(model=str(quant_model_dir), learning_rate=1e-3, trainable="lora"), datamodule=data(train_samples=8))
    module = MKAModule(model=str(quant_model_dir), trainable="lora")
    merge = MergeCallback(target_layers=4, num_points=128, export_dir=str(tmp_path / "export"))
    trainer(tmp_path, [merge]).validate(module, datamodule=data(), ckpt_path=fit.checkpoint_callback.best_model_path)
    keys = set(load_file(tmp_path / "export" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in keys)
    exported = MKAModule(model=str(tmp_path / "export")).model
    assert keys == set(exported.state_dict()) - {"lm_head.weight"} or keys == set(exported.state_dict())
    ids = torch.randint(4, 120, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, module.model(input_ids=ids).logits)
