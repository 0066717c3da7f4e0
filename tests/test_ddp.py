"""Two CPU processes (DDP, gloo) compress to the same plan and bit-identical weights as one process."""

import hashlib
import json
import subprocess
import sys

from test_resume import write_config


def test_ddp_two_processes_equal_single_process(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    digests, plans = {}, {}
    for name, extra in [("single", []), ("ddp", ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"])]:
        config = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / f"export-{name}")
        proc = subprocess.run([sys.executable, "-m", "lightning_mka.cli", "validate", "--config", str(config), *extra],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests[name] = hashlib.sha256((tmp_path / f"export-{name}" / "model.safetensors").read_bytes()).hexdigest()
        plans[name] = json.loads((tmp_path / f"export-{name}" / "mka_merge_plan.json").read_text())
    assert plans["ddp"] == plans["single"] and len(plans["single"]["steps"]) == 3
    assert digests["ddp"] == digests["single"]
