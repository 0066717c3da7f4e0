"""The command line and the asset cache: one-line errors, exit codes, a config that round-trips."""

import os
import shutil

import pytest
from conftest import assert_one_line_error, cli_in_process

from lightning_mka import assets
from lightning_mka.errors import MKAError
from lightning_mka.loading import resolve_model_source


def test_wrong_model_path(tmp_path):
    proc = cli_in_process("validate", "--model.model", str(tmp_path / "nope"), cwd=tmp_path)
    assert_one_line_error(proc, f"model path '{tmp_path / 'nope'}' does not exist")


def test_unknown_asset_name(tmp_path):
    proc = cli_in_process("validate", "--model.model", "smollm3-1b", cwd=tmp_path)
    assert_one_line_error(proc, "unknown asset 'smollm3-1b'; known model assets: smollm2-135m, gemma3-270m")


def test_empty_data_file(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = cli_in_process("validate", "--model.model", str(tiny_model_dir), "--data.calibration", str(empty), "--data.eval_texts", "[]", "--data.seq_len", "32", cwd=tmp_path)
    assert_one_line_error(proc, f"calibration file '{empty}' is empty; pass UTF-8 text (.txt) or JSON lines (.jsonl)")
    assert not (tmp_path / "exports").exists()


def test_a_sequence_longer_than_the_models_context_is_refused(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    # The tiny Llama was trained for 256 positions (max_position_embeddings): 257 tokens would be positions it never saw.
    from conftest import write_config

    config = write_config(tmp_path / "long.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export", data={"seq_len": 257})
    proc = cli_in_process("validate", "--config", str(config), cwd=tmp_path)
    assert_one_line_error(proc, "data.seq_len=257 exceeds the model's context of 256 tokens (max_position_embeddings); set data.seq_len <= 256")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "heldout.txt", "long.yaml", "tiny-llama"]


def test_context_length_reads_the_text_config():
    from transformers import Gemma3Config

    from conftest import tiny_config
    from lightning_mka.loading import check_seq_len, context_length

    assert context_length(tiny_config("llama")) == 256
    wrapper = Gemma3Config(text_config=tiny_config("gemma3").to_dict())  # a multimodal config: the length is its text config's
    assert context_length(wrapper) == 256
    check_seq_len(256, wrapper)
    with pytest.raises(MKAError, match="exceeds the model's context of 256"):
        check_seq_len(512, wrapper)


def test_unknown_yaml_key_is_refused(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  modle: smollm2-135m\n")
    proc = cli_in_process("validate", "--config", str(config), cwd=tmp_path)
    assert proc.returncode != 0 and "modle" in proc.stderr


def test_print_config_round_trips(tmp_path):
    first = cli_in_process("fit", "--print_config", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "model: smollm2-135m" in first.stdout and "TensorBoardLogger" in first.stdout
    saved = tmp_path / "config.yaml"
    saved.write_text(first.stdout)
    second = cli_in_process("fit", "--config", str(saved), "--print_config", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


def test_model_source_resolution(tmp_path):
    with pytest.raises(MKAError, match="has no config.json"):
        resolve_model_source(str(tmp_path))
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"x")
    with pytest.raises(MKAError, match="is not a .gguf file"):
        resolve_model_source(str(bad))
    with pytest.raises(MKAError, match="is data, not a model"):
        resolve_model_source("wiki")
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", {})


def test_truncated_safetensors_is_one_clear_error(tmp_path, tiny_model_dir):
    from lightning_mka.loading import load_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MKAError, match="weights file .*model.safetensors. is truncated or not safetensors .*; re-export the model, or fetch it again"):
        load_model(str(broken))


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty asset cache with no package index reachable."""
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    return tmp_path / "cache"


def test_missing_asset_without_registry_says_how_to_fetch(offline_cache):
    with pytest.raises(MKAError, match=r"asset 'lee' is missing and `pip download --no-deps gensim==4.4.0` failed .*lightning-mka-assets fetch lee"):
        assets.asset_path("lee")


def test_corrupt_cached_file_is_never_used(offline_cache):
    raw = offline_cache / "raw" / "lee_background.cor"
    raw.parent.mkdir(parents=True)
    raw.write_text("half a download")
    with pytest.raises(MKAError, match="is missing"):
        assets.asset_path("lee")
    assert not raw.exists()


@pytest.fixture
def cached_lee(offline_cache):
    """The offline cache holding a verified copy of the lee asset (from this machine's own cache)."""
    source = os.path.expanduser("~/.cache/lightning_mka/raw/lee_background.cor")
    if not os.path.exists(source):
        pytest.skip("run `lightning-mka-assets fetch` first")
    raw = offline_cache / "raw" / "lee_background.cor"
    raw.parent.mkdir(parents=True)
    shutil.copy(source, raw)
    return raw


def test_verified_cached_file_is_used_offline(cached_lee):
    assert assets.asset_path("lee") == cached_lee


def test_reading_a_cached_asset_changes_nothing_in_the_cache(cached_lee, offline_cache):
    """A cache shared by many runs (or checked by a backup) is only read once it holds the assets: the lock file was
    truncated, and so rewritten, on every read."""
    import time

    def snapshot():
        return {str(p): p.stat().st_mtime_ns for p in offline_cache.rglob("*")}

    assets.asset_path("lee")  # the first read may create the lock file
    before = snapshot()
    time.sleep(0.05)
    assert assets.asset_path("lee") == cached_lee
    assert snapshot() == before


def test_unknown_asset_in_fetch_command(capsys):
    assert assets.main(["fetch", "nope"]) == 2
    assert "unknown asset 'nope'" in capsys.readouterr().err


def test_callback_argument_error_is_one_line_through_the_cli(tmp_path):
    # jsonargparse wraps errors raised while instantiating callbacks; the CLI still prints ours alone.
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer:\n  logger: false\n  callbacks:\n    - class_path: lightning_mka.callbacks.MergeCallback\n"
        "      init_args:\n        compression_ratio: 1.5\n"
    )
    assert_one_line_error(cli_in_process("validate", "--config", str(config), cwd=tmp_path), "compression_ratio=1.5 must be in (0, 1)")


def test_mps_is_never_chosen_for_float64_solves(tmp_path, tiny_model_dir):
    """MPS has no float64: ``auto`` takes the CPU where Lightning would take MPS; ``mps`` is refused in one line,
    before the trainer writes anything."""
    from lightning_mka.cli import choose_accelerator

    assert choose_accelerator("auto", cuda=False, mps=True) == "cpu"
    assert choose_accelerator("auto", cuda=True, mps=True) == "auto"
    assert choose_accelerator("auto", cuda=False, mps=False) == "auto"
    assert choose_accelerator("gpu", cuda=True, mps=False) == "gpu"
    with pytest.raises(MKAError, match="accelerator mps"):
        choose_accelerator("mps", cuda=False, mps=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = cli_in_process("validate", "--model.model", str(tiny_model_dir), "--trainer.accelerator", "mps", cwd=run_dir)
    assert_one_line_error(proc, "trainer.accelerator mps cannot run the float64 solves of the merge; use --trainer.accelerator cpu")
    assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize("precision, device, capability, machine, warned", [
    ("bf16-mixed", "cpu", "AVX2", "x86_64", True),     # the heal recipes on an AVX2-only CPU: ~20x slower than fp32
    ("bf16-true", "cpu", "DEFAULT", "AMD64", True),
    ("bf16-mixed", "cpu", "AVX512", "x86_64", False),  # AVX512-BF16 / AMX machines report AVX512: bf16 pays off
    ("bf16-mixed", "cuda", "AVX2", "x86_64", False),   # the host CPU does not run the matmuls
    ("32-true", "cpu", "AVX2", "x86_64", False),
    ("bf16-mixed", "cpu", "DEFAULT", "aarch64", False),
])
def test_bf16_on_a_cpu_without_avx512_gets_a_note_with_the_fix(precision, device, capability, machine, warned):
    from lightning_mka.cli import slow_bf16_note

    note = slow_bf16_note(precision, device, capability, machine)
    assert (note is not None) == warned
    if warned:
        assert len(note.splitlines()) == 1 and precision in note and "--trainer.precision 32" in note


def test_the_cli_warns_of_bf16_on_this_kind_of_cpu(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout, monkeypatch):
    """The trainer's real precision and device reach the check: bf16-mixed on a CPU reported as AVX2 warns; fp32 does not."""
    import torch
    from conftest import write_config

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    said = []  # Lightning's info logger writes to the stderr it found at import, which cli_in_process cannot capture
    monkeypatch.setattr("lightning_mka.cli.rank_zero_info", said.append)
    for precision, warned in (("bf16-mixed", True), ("32-true", False)):
        said.clear()
        config = write_config(tmp_path / f"{precision}.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / f"export-{precision}")
        proc = cli_in_process("validate", "--config", str(config), "--trainer.precision", precision, "--trainer.accelerator", "cpu", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert any("--trainer.precision 32 unless you need bf16" in line for line in said) == warned, (precision, said)


def test_a_trainer_option_that_cannot_work_is_one_line(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    from conftest import write_config

    config = write_config(tmp_path / "t.yaml", tiny_model_dir, tiny_corpus, tiny_heldout, tmp_path / "export")
    proc = cli_in_process("validate", "--config", str(config), "--trainer.strategy", "ddpx", cwd=tmp_path)
    assert_one_line_error(proc, "trainer: You selected an invalid strategy name")
    assert "fix that trainer option (e.g. --trainer.accelerator, --trainer.devices, --trainer.strategy)" in proc.stderr
    assert not (tmp_path / "export").exists()


def test_a_permission_error_is_not_called_a_full_disk():
    import errno

    from lightning_mka.cli import failed_write

    line = failed_write(PermissionError(errno.EACCES, "Permission denied", "/data/model/model.safetensors"))
    assert line.startswith("cannot access '/data/model/model.safetensors' (Permission denied); make the inputs readable") and "free space" not in line


def test_a_read_only_cache_that_holds_the_assets_is_used(cached_lee, monkeypatch):
    """A cache fetched once onto a read-only volume: the lock file cannot be created, and nothing needs building."""
    import builtins
    import errno

    real_open = builtins.open

    def read_only(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    assert assets.asset_path("lee") == cached_lee


def test_a_hand_placed_file_with_the_wrong_checksum_is_named_when_removed(offline_cache):
    raw = offline_cache / "raw" / "lee_background.cor"
    raw.parent.mkdir(parents=True)
    raw.write_text("not the corpus")
    with pytest.raises(MKAError, match=f"the file that was at {raw} had sha256 [0-9a-f]{{64}}, not [0-9a-f]{{64}}, and was removed"):
        assets.asset_path("lee")


def test_peak_memory_is_in_megabytes_on_macos_too(monkeypatch):
    import resource
    import sys
    from types import SimpleNamespace

    from lightning_mka.reporting import peak_rss_mb

    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=3 * 2**30 if sys.platform == "darwin" else 3 * 2**20))
    assert peak_rss_mb() == 3072.0
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=3 * 2**30))  # bytes there
    assert peak_rss_mb() == 3072.0
