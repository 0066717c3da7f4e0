"""Kill a compression run with SIGKILL after merge k, rerun the same command, get bit-identical weights."""

import hashlib
import json
import os
import signal
import subprocess
import sys

from conftest import write_config

KILLER = """
import os, signal, sys
from lightning_mka.callbacks.merge import MergeCallback
kill_after = int(os.environ.get("KILL_AFTER", "0"))
write = MergeCallback._write_progress
def write_then_maybe_die(self, trainer):
    write(self, trainer)
    if kill_after and len(self._merger.plan) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
MergeCallback._write_progress = write_then_maybe_die
from lightning_mka.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(config, cwd, kill_after=0):
    env = {**os.environ, "KILL_AFTER": str(kill_after), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", KILLER, "validate", "--config", str(config)], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigkill_after_merge_then_rerun_is_bit_identical(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    straight = write_config(tmp_path / "a.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export-a")
    proc = run(straight, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    config = write_config(tmp_path / "b.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export-b")
    progress = tmp_path / "export-b.mka-progress.json"
    killed = run(config, tmp_path, kill_after=2)
    assert killed.returncode == -signal.SIGKILL
    assert [s["depth_after"] for s in json.loads(progress.read_text())["steps"]] == [5, 4]
    assert not (tmp_path / "export-b").exists()  # nothing half-written

    resumed = run(config, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout and "replayed 2 merges" in resumed.stderr + resumed.stdout
    assert not progress.exists()
    assert digest(tmp_path / "export-a" / "model.safetensors") == digest(tmp_path / "export-b" / "model.safetensors")
    plan_a = json.loads((tmp_path / "export-a" / "mka_merge_plan.json").read_text())
    plan_b = json.loads((tmp_path / "export-b" / "mka_merge_plan.json").read_text())
    assert plan_a == plan_b and len(plan_a["steps"]) == 3


def test_progress_from_another_configuration_is_refused(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    config = write_config(tmp_path / "b.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export")
    assert run(config, tmp_path, kill_after=1).returncode == -signal.SIGKILL
    other = write_config(tmp_path / "c.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export", alpha=0.5)
    proc = run(other, tmp_path)
    assert proc.returncode == 2
    assert "was written by a different configuration; delete it, or set resume: false" in proc.stderr.strip().splitlines()[-1]


def test_a_run_resumed_where_it_cannot_replay_everything_still_ends_bit_identical(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    # rescore_every: 2 killed after merge 1: merge 2 would read merge 1's scoring, which a rerun does not have, so the
    # rerun says so and merges again from the start; killed after merge 2 (the next merge scores anew) it replays both.
    # Either way the export equals an uninterrupted run's.
    options = {"merge_operator": "parallel_pruned", "rescore_every": 2}
    straight = write_config(tmp_path / "a.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export-a", **options)
    assert run(straight, tmp_path).returncode == 0
    for killed_after, replayed in ((1, 0), (2, 2)):
        export = tmp_path / f"export-{killed_after}"
        config = write_config(tmp_path / f"b{killed_after}.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, export, **options)
        assert run(config, tmp_path, kill_after=killed_after).returncode == -signal.SIGKILL
        resumed = run(config, tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        said = resumed.stderr + resumed.stdout
        if replayed < killed_after:
            assert f"resuming from its first {replayed} of {killed_after} merges and merging the rest again" in said
        assert (f"replayed {replayed} merges" in said) == (replayed > 0)
        assert digest(tmp_path / "export-a" / "model.safetensors") == digest(export / "model.safetensors")
