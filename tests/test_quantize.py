"""Quantization after merging: int8 / nf4 through bitsandbytes on CPU, measured and exported."""

import json
import sys

import lightning as L
import pytest
import torch

from lightning_mka.callbacks import MergeCallback, QuantizeCallback
from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.errors import MKAError
from lightning_mka.module import MKAModule
from lightning_mka.quantization import load_quantized


def test_quantize_after_merging_exports_reloadable_smaller_models(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    L.seed_everything(0)
    module = MKAModule(model=str(tiny_model_dir))
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=8, seq_len=32,
                                 batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4)
    merge = MergeCallback(target_layers=4, num_points=128, export_dir=str(tmp_path / "merged"))
    quantize = QuantizeCallback(modes=["int8", "nf4"])
    trainer = L.Trainer(accelerator="cpu", callbacks=[merge, quantize], logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"),
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data)
    results = json.loads((tmp_path / "logs" / "version_0" / "quantization.json").read_text())
    name = f"{tiny_heldout}_ppl"
    float_ppl = results["float"]["metrics"][name]
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
    # (nf4 < int8 holds for real widths; at hidden size 32 the per-block metadata dominates.)


def test_quantization_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(MKAError, match="quantization nf4 needs bitsandbytes.*pip install bitsandbytes"):
        QuantizeCallback(modes=["nf4"])


def test_unknown_quantization_mode():
    with pytest.raises(MKAError, match="unknown quantization 'int4'"):
        QuantizeCallback(modes=["int4"])


def test_quantize_after_healing_in_fit(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    L.seed_everything(0)
    module = MKAModule(model=str(tiny_model_dir), learning_rate=1e-3)
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=8, train_samples=8,
                                 seq_len=32, batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=4)
    merge = MergeCallback(target_layers=5, num_points=128, export_dir=str(tmp_path / "healed"))
    quantize = QuantizeCallback(modes=["nf4"])
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, callbacks=[merge, quantize], logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=-1)
    trainer.fit(module, datamodule=data)
    results = json.loads((tmp_path / "logs" / "version_0" / "quantization.json").read_text())
    name = f"{tiny_heldout}_ppl"
    assert results["float"]["metrics"][name] == module.last_metrics[name]  # the healed model's final validation
    assert name in results["nf4"]["metrics"] and (tmp_path / "healed-nf4" / "config.json").exists()
