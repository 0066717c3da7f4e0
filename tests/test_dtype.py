"""bfloat16 end to end on tiny models: the merge paths (average, parallel_pruned, replaceme), evaluation and the export
keep the model's dtype (no silent float32), and the figures stay close to float32's."""

import json
import math

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_mka.callbacks import MergeCallback
from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.evaluation import continuation_logprobs, shifted_token_nll
from lightning_mka.module import MKAModule
from lightning_mka.surgery import decoder_stack
from conftest import tiny_model


def compress(model_dir, corpus, heldout, out, dtype, **merge):
    L.seed_everything(0)
    module = MKAModule(model=str(model_dir), dtype=dtype)
    data = CalibrationDataModule(tokenizer=str(model_dir), calibration=str(corpus), calibration_samples=8, seq_len=32, batch_size=4,
                                 eval_texts=[str(heldout)], eval_samples=4)
    callback = MergeCallback(target_layers=4, num_points=128, seed=0, export_dir=str(out / "export"), **merge)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=L.pytorch.loggers.CSVLogger(out, name="logs"), callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data)
    return module, json.loads((out / "logs" / "version_0" / "results.json").read_text())


MERGES = {
    "average": {"merge_operator": "average"},
    "parallel_pruned": {"merge_operator": "parallel_pruned"},
    "parallel_pruned_damage": {"merge_operator": "parallel_pruned", "selection": "damage"},
    "replaceme": {"method": "replaceme"},
}


@pytest.mark.parametrize("name", list(MERGES))
def test_bfloat16_merge_paths_keep_the_dtype(name, tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    module, results = compress(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "bf16", "bfloat16", **MERGES[name])
    _, reference = compress(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "fp32", "float32", **MERGES[name])
    assert len(decoder_stack(module.model)[1]) == 4
    # Merged, pruned and refitted weights alike (the rotary inverse frequencies are float32 by design in transformers).
    buffers = [t for n, t in module.model.named_buffers() if "inv_freq" not in n]
    dtypes = {t.dtype for t in [*module.model.parameters(), *buffers] if t.is_floating_point()}
    assert dtypes == {torch.bfloat16}, dtypes
    ppl = f"{tiny_heldout}_ppl"
    # The dense model's figures in bfloat16 are float32's to bfloat16 rounding; the compressed model's stay close.
    assert results["metrics_before"][ppl] == pytest.approx(reference["metrics_before"][ppl], rel=0.005)
    assert math.isfinite(results["metrics_after"][ppl]) and results["metrics_after"][ppl] > 1
    assert results["metrics_after"][ppl] == pytest.approx(reference["metrics_after"][ppl], rel=0.02)
    # The export is bfloat16 on disk and reloads to the same logits.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "export", dtype="auto").eval()
    assert reloaded.config.num_hidden_layers == 4 and {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    ids = torch.randint(4, 120, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, module.model(ids).logits, rtol=0, atol=0)


def test_bfloat16_evaluation_math_is_float32_and_close():
    fp32 = tiny_model("llama", layers=4)
    bf16 = tiny_model("llama", layers=4).to(torch.bfloat16)
    ids = torch.randint(4, 120, (3, 24))
    with torch.no_grad():
        nll32, count32, _ = shifted_token_nll(fp32(ids).logits, ids)
        nll16, count16, _ = shifted_token_nll(bf16(ids).logits, ids)
        assert nll16.dtype == torch.float64 and count16 == count32
        assert float(nll16) == pytest.approx(float(nll32), rel=0.01)
        context, choices = [5, 9, 13, 17, 21], [[30], [31, 32], [33, 34, 35]]
        scores32, scores16 = continuation_logprobs(fp32, context, choices), continuation_logprobs(bf16, context, choices)
    assert scores16.dtype == torch.float32
    torch.testing.assert_close(scores16, scores32, rtol=0.02, atol=0.05)


def test_bfloat16_model_quantizes_with_bfloat16_compute(tiny_corpus, tiny_heldout, tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_quantize import save_model

    from lightning_mka.callbacks import QuantizeCallback

    model_dir = save_model(tmp_path / "tiny-llama-64")
    L.seed_everything(0)
    module = MKAModule(model=str(model_dir), dtype="bfloat16")
    data = CalibrationDataModule(tokenizer=str(model_dir), calibration=str(tiny_corpus), calibration_samples=8, seq_len=32, batch_size=4,
                                 eval_texts=[str(tiny_heldout)], eval_samples=4)
    quantize = QuantizeCallback(modes=["int8", "nf4"], export_dir=str(tmp_path / "q-{mode}"))
    L.Trainer(accelerator="cpu", callbacks=[quantize], logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"), enable_progress_bar=False,
              enable_model_summary=False).validate(module, datamodule=data)
    results = json.loads((tmp_path / "logs" / "version_0" / "quantization.json").read_text())
    ppl = f"{tiny_heldout}_ppl"
    for mode in ("int8", "nf4"):
        assert abs(results[mode]["metrics"][ppl] / results["float"]["metrics"][ppl] - 1) < 0.2
        config = json.loads((tmp_path / f"q-{mode}" / "config.json").read_text())
        assert config["dtype"] == "bfloat16", config.get("dtype")  # computes in the float model's dtype, not float32
        if mode == "nf4":
            assert config["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"


def test_gpu_ready_defaults(tmp_path):
    """`accelerator: auto` everywhere: a GPU where one is present, the CPU here."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from lightning_mka.cli import TRAINER_DEFAULTS

    assert TRAINER_DEFAULTS["accelerator"] == "auto"
    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs and all(yaml.safe_load(c.read_text())["trainer"]["accelerator"] == "auto" for c in configs)
    printed = subprocess.run([sys.executable, "-m", "lightning_mka.cli", "validate", "--print_config"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert yaml.safe_load(printed.stdout)["trainer"]["accelerator"] == "auto"
