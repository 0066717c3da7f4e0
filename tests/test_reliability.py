"""Bad input fails fast with one line; interrupted exports leave the previous state; inputs are never modified."""

import errno
import hashlib
import os

import pytest

from conftest import tiny_model, tiny_tokenizer
from lightning_mka.assets import cache_dir
from lightning_mka.errors import MKAError
from lightning_mka.export import check_export_dir, export_pretrained
from lightning_mka.loading import load_model


def tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_disk_full_during_export_keeps_the_previous_export(tmp_path, monkeypatch):
    target = tmp_path / "export"
    target.mkdir()
    (target / "config.json").write_text("{}")  # a previous export (overwrite replaces nothing else)
    (target / "previous.txt").write_text("the last good export")
    model = tiny_model("llama", layers=2)

    def save_half_then_fail(directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", save_half_then_fail)
    with pytest.raises(MKAError, match="failed \\(No space left on device\\); free space or choose another export_dir") as info:
        export_pretrained(model, tiny_tokenizer(), target, overwrite=True)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "previous.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp dir left behind


def test_export_replaces_atomically_when_overwriting(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "stale.txt").write_text("old")
    export_pretrained(tiny_model("llama", layers=2), tiny_tokenizer(), target, overwrite=True)
    names = {p.name for p in target.iterdir()}
    assert "stale.txt" not in names and "model.safetensors" in names and "config.json" in names
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_export_that_never_lands_is_an_error_not_a_silent_success(tmp_path, monkeypatch):
    """When every rename into place loses a race (the target keeps vanishing), the export fails in one line and
    leaves no temp dir; it never returns a path where nothing was written."""
    target = tmp_path / "export"
    real_replace = os.replace

    def target_vanishes(src, dst):
        if os.fspath(dst) == os.fspath(target):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.fspath(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", target_vanishes)
    with pytest.raises(MKAError, match="export to .* failed: another process kept moving the directory away.*let one run write each export_dir") as raised:
        export_pretrained(tiny_model("llama", layers=2), tiny_tokenizer(), target)
    assert "free space" not in str(raised.value)  # a race, not a full disk
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_a_previous_export_or_an_empty_dir(tmp_path, monkeypatch):
    """``overwrite: true`` with export_dir pointing at a directory of other files (a project, ~/models, '.') used to
    move it aside and delete it."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("a week of work")
    model, tokenizer = tiny_model("llama", layers=2), tiny_tokenizer()
    with pytest.raises(MKAError, match="holds files but no model \\(no config.json\\); overwrite: true replaces only a previous export or an empty directory"):
        export_pretrained(model, tokenizer, project, overwrite=True)
    assert [p.name for p in project.iterdir()] == ["notes.txt"] and (project / "notes.txt").read_text() == "a week of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_pretrained(model, tokenizer, empty, overwrite=True) / "config.json").exists()
    # Never the directory a run writes its logs into: '.', '..', '/', or one holding the run dir.
    monkeypatch.chdir(empty)
    for target in (".", "..", "/"):
        with pytest.raises(MKAError, match=f"export dir '{target}' holds the current directory, whose logs and results an export would replace"):
            check_export_dir(target, overwrite=True)
    with pytest.raises(MKAError, match="holds the run dir"):
        check_export_dir(tmp_path / "out", overwrite=True, run_dir=tmp_path / "out" / "runs" / "mka")
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link"  # a symlinked export dir: the dir it names is replaced, the link stays
    link.symlink_to(empty)
    assert check_export_dir(link, overwrite=True) == empty  # checked (writable, stale temps) where it is written
    export_pretrained(model, tokenizer, link, overwrite=True)
    assert link.is_symlink() and (empty / "config.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link", "project"]


def test_a_stop_between_the_two_renames_puts_the_previous_export_back(tmp_path, monkeypatch):
    from lightning_mka.signals import Stopped

    target = tmp_path / "export"
    export_pretrained(tiny_model("llama", layers=2, seed=1), tiny_tokenizer(), target)
    before = tree_digest(target)
    real_replace = os.replace

    def stop_after_moving_aside(src, dst):
        if os.fspath(dst) == os.fspath(target) and ".old-" not in os.path.basename(src):  # the new export's rename into place
            raise Stopped(15)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", stop_after_moving_aside)
    with pytest.raises(Stopped):
        export_pretrained(tiny_model("llama", layers=2, seed=2), tiny_tokenizer(), target, overwrite=True)
    monkeypatch.undo()
    assert tree_digest(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # neither the new temp dir nor the old one is left


def test_unwritable_export_dir(tmp_path, monkeypatch):
    # (root ignores permission bits, so the check is driven through os.access)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(MKAError, match="is not writable"):
        check_export_dir(tmp_path / "new" / "export", overwrite=False)


def test_export_dir_that_is_a_file(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(MKAError, match="is a file"):
        check_export_dir(tmp_path / "x", overwrite=True)


def test_truncated_gguf_is_one_clear_error(tmp_path):
    gguf = cache_dir() / "raw" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        pytest.skip("run `lightning-mka-assets fetch smollm2-135m` first")
    truncated = tmp_path / "model.gguf"
    with open(gguf, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(MKAError, match="GGUF file .*model.gguf. is truncated or damaged .*; download the .gguf file again") as info:
        load_model(str(truncated))
    assert "\n" not in str(info.value)


def test_compression_never_modifies_the_input_model(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    from test_merge_callback import run_validate

    before = tree_digest(tiny_model_dir)
    run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "run")
    assert tree_digest(tiny_model_dir) == before


def test_same_config_same_metrics(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path):
    from test_merge_callback import run_validate

    first, _ = run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "a", export=False)
    second, _ = run_validate(tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "b", export=False)
    assert first.last_metrics == second.last_metrics
    assert first.merge_plan == second.merge_plan
