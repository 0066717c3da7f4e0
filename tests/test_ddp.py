"""Two CPU processes (DDP, gloo) compress to the same plan and bit-identical weights as one process."""

import hashlib
import json
import subprocess
import sys

import pytest
from conftest import write_config


@pytest.mark.parametrize("merge", [{}, {"selection": "verify", "verify_top": 3}], ids=["default", "verify"])
def test_ddp_two_processes_equal_single_process(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout, merge):
    # selection: verify scores tentative merges on the first calibration sequences by global index: each rank's own
    # first batch would be other sequences (shards interleave), and gave another plan.
    digests, plans = {}, {}
    for name, extra in [("single", []), ("ddp", ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"])]:
        config = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / f"export-{name}", **merge)
        proc = subprocess.run([sys.executable, "-m", "lightning_mka.cli", "validate", "--config", str(config), *extra],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests[name] = hashlib.sha256((tmp_path / f"export-{name}" / "model.safetensors").read_bytes()).hexdigest()
        plans[name] = json.loads((tmp_path / f"export-{name}" / "mka_merge_plan.json").read_text())
    assert plans["ddp"] == plans["single"] and len(plans["single"]["steps"]) == 3
    assert digests["ddp"] == digests["single"]


def test_parallel_pruned_across_world_sizes_same_plan_weights_within_tolerance(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    """The Gram statistics of parallel_pruned are summed per rank, then across ranks: another order than one process,
    so the weights may differ (README, Guarantees: within 2e-3 relative to the tensor's largest entry: the statistics
    are float32 sums, and the ridge solve amplifies their rounding; the plan and metrics are the same). The pairs and the kept neurons / KV groups are identical. Also prints the largest difference."""
    import torch
    from safetensors.torch import load_file

    # (a tiny Llama: saved with our word-level tokenizer, a Qwen2 dir would load Qwen2's tokenizer class instead)
    model_dir = tiny_model_dir
    weights, plans, metrics = {}, {}, {}
    for name, extra in [("single", []), ("ddp", ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"])]:
        config = write_config(tmp_path / f"{name}.yaml", model_dir, tiny_corpus, tiny_heldout, tmp_path / f"export-{name}", merge_operator="parallel_pruned")
        proc = subprocess.run([sys.executable, "-m", "lightning_mka.cli", "validate", "--config", str(config), *extra],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[name] = load_file(tmp_path / f"export-{name}" / "model.safetensors")
        plans[name] = json.loads((tmp_path / f"export-{name}" / "mka_merge_plan.json").read_text())["steps"]
        metrics[name] = json.loads((tmp_path / "results.json").read_text())["metrics_after"]
    exact = ("pair", "pair_original", "merged_original", "depth_after", "kept_kv_groups", "kept_neurons")
    assert [{k: s[k] for k in exact} for s in plans["ddp"]] == [{k: s[k] for k in exact} for s in plans["single"]]
    for a, b in zip(plans["single"], plans["ddp"]):
        assert abs(a["score"] - b["score"]) <= 1e-6 and abs((a["damage"] or 0) - (b["damage"] or 0)) <= 1e-5
    for key, value in metrics["single"].items():
        assert abs(metrics["ddp"][key] - value) <= 1e-4 * max(1.0, abs(value)), key
    assert weights["ddp"].keys() == weights["single"].keys()
    worst = max(float(((weights["ddp"][k] - t).abs().max() / t.abs().max().clamp(min=1e-12))) for k, t in weights["single"].items())
    print(f"largest relative difference across world sizes: {worst:.3g}")
    assert worst <= 2e-3, worst


def test_ddp_layerwise_disk_equals_single_process_layerwise(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    """DDP with ``execution: layerwise, offload: disk``: each rank runs the model one layer at a time from the same
    safetensors, spilling merged layers into its own temporary dir under the shared ``offload_dir``; the plan, the
    metrics and the exported bytes equal one layer-wise process's (which equals the whole-model run:
    tests/test_execution.py)."""
    digests, plans, metrics, output = {}, {}, {}, {}
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    for name, extra in [("single", []), ("ddp", ddp)]:
        config = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / f"export-{name}")
        layerwise = ["--model.execution=layerwise", "--model.offload=disk", f"--model.offload_dir={tmp_path / f'scratch-{name}'}"]
        proc = subprocess.run([sys.executable, "-m", "lightning_mka.cli", "validate", "--config", str(config), *layerwise, *extra],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        output[name] = proc.stdout + proc.stderr
        digests[name] = hashlib.sha256((tmp_path / f"export-{name}" / "model.safetensors").read_bytes()).hexdigest()
        plans[name] = json.loads((tmp_path / f"export-{name}" / "mka_merge_plan.json").read_text())
        metrics[name] = json.loads((tmp_path / "results.json").read_text())["metrics_after"]
        assert (tmp_path / f"scratch-{name}").is_dir()  # merged layers were spilled to disk: the disk-offload path ran
    assert "Starting with 2 processes" in output["ddp"] and "Starting with 2 processes" not in output["single"]
    assert len(plans["single"]["steps"]) == 3
    assert plans["ddp"] == plans["single"]
    assert digests["ddp"] == digests["single"]
    assert metrics["ddp"] == metrics["single"]
