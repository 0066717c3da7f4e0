"""Shared fixtures: tiny random models built from configs in code, and the real SmolLM2 for slow tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_guard import repository_unchanged  # noqa: F401  (autouse, session: the suite leaves the repository as it was)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


USER_CACHES = {"HF_HOME": "huggingface", "HF_DATASETS_CACHE": "huggingface/datasets", "MPLCONFIGDIR": "matplotlib"}
_CACHES = pytest.StashKey[tuple]()  # this run's cache dir and the variables it replaced


def pytest_configure(config):
    """Library caches that the code under test fills by default in the user's home (matplotlib's font list, the HF
    datasets / hub caches, pip's) go to a temp dir of this run, for subprocesses too. Set here, before any test module
    is imported: lightning imports torchmetrics, which imports matplotlib, which fixes its config dir on import. The
    asset cache (~/.cache/lightning_mka, filled by `make assets`) is read where it is; tests that build assets point
    it elsewhere."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="mka-test-caches-"))
    config.stash[_CACHES] = (home, {name: os.environ.get(name) for name in [*USER_CACHES, "PIP_NO_CACHE_DIR"]})
    os.environ.update({name: str(home / sub) for name, sub in USER_CACHES.items()}, PIP_NO_CACHE_DIR="1")


def pytest_unconfigure(config):
    import shutil

    home, saved = config.stash.get(_CACHES, (None, {}))
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


def cli(*args, cwd=None, env=None, timeout=600):
    """``lightning-mka <args>`` in a fresh process: exit status and stderr as a user sees them."""
    return subprocess.run([sys.executable, "-m", "lightning_mka.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def cli_in_process(*args, cwd):
    """``lightning-mka <args>`` run by ``lightning_mka.cli.main`` in this process (no interpreter start-up: seconds
    per call), for runs that end before any rank starts (refusals, --help, --print_config): its exit status, stdout
    and stderr as ``cli`` returns them. The working directory, stop handlers and thread excepthook are put back."""
    import contextlib
    import io
    import signal
    import threading
    import types

    from lightning_mka import cli as cli_module
    from lightning_mka import signals

    handlers = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    excepthook, where = threading.excepthook, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli_module.main(list(args))
            except SystemExit as exit_:  # --help, --print_config, argument errors
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    finally:
        os.chdir(where)
        threading.excepthook = excepthook
        for s, handler in handlers.items():
            signal.signal(s, handler)
        signals.reset()
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_one_line_error(proc, expected):
    """Exit status 2, no traceback, and a last line ``error: ...`` that contains ``expected``."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last


def tiny_config(kind: str = "llama", layers: int = 6, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        config = LlamaConfig(**common)
    elif kind == "mistral":
        config = MistralConfig(**common, sliding_window=16)
    elif kind == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    elif kind == "qwen3":
        config = Qwen3Config(**common, head_dim=8)
    elif kind == "gemma3":
        config = Gemma3TextConfig(**common, head_dim=8, sliding_window=8, sliding_window_pattern=2)
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(kind: str = "llama", layers: int = 6, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, layers, **overrides), dtype=torch.float32)
    return model.eval()


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def smollm2_available() -> bool:
    from lightning_mka.assets import cache_dir

    return (cache_dir() / "models" / "smollm2-135m" / "config.json").exists()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2 (fetched by `make test` through `lightning-mka-assets fetch`)."""
    from lightning_mka.assets import asset_path

    return asset_path("smollm2-135m")


def smollm2_merge(out: Path, target_layers: int, num_points: int, seq_len: int = 256, merge_callback: dict | None = None, **module_options):
    """``validate`` SmolLM2 merged to ``target_layers`` (wiki calibration, 4 samples; 2 wiki evaluation samples, no
    MMLU), exported to ``out/export``, logs in ``out/logs/version_0``. Returns the MKAModule."""
    import lightning as L

    from lightning_mka.callbacks import MergeCallback
    from lightning_mka.datamodules import CalibrationDataModule
    from lightning_mka.module import MKAModule

    L.seed_everything(0)
    module = MKAModule(model="smollm2-135m", **module_options)
    data = CalibrationDataModule(tokenizer="smollm2-135m", calibration="wiki", calibration_samples=4, seq_len=seq_len, batch_size=4,
                                 eval_texts=["wiki"], eval_samples=2, mmlu_per_topic=0)
    callback = MergeCallback(target_layers=target_layers, num_points=num_points, export_dir=str(out / "export"), **(merge_callback or {}))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=L.pytorch.loggers.CSVLogger(out, name="logs"), callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data)
    return module


WORDS = [f"w{i}" for i in range(120)]


def tiny_tokenizer():
    """A word-level fast tokenizer over WORDS (+ specials), built in code: no hub needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_corpus(path: Path, documents: int = 40, words: int = 120, seed: int = 0) -> Path:
    """Text with structure (a random walk over the vocabulary) so layers see non-trivial inputs."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(documents):
        steps = torch.randint(-3, 4, (words,), generator=g).cumsum(0) % len(WORDS)
        lines.append(" ".join(WORDS[int(i)] for i in steps))
    path.write_text("\n\n".join(lines) + "\n")
    return path


def write_config(path: Path, model_dir, corpus, heldout, export_dir, data: dict | None = None, **merge) -> Path:
    """A ``validate`` config: a MergeCallback (tiny-model defaults, overridden by ``merge``) over ``model_dir``, with
    ``data`` overriding the datamodule's tiny defaults (the tests, bench/faults.py)."""
    options = {"target_layers": 3, "num_points": 128, "export_dir": str(export_dir), **merge}
    lines = "\n".join(f"        {k}: {json.dumps(v)}" for k, v in options.items())
    data = {"calibration": corpus, "calibration_samples": 8, "seq_len": 32, "eval_texts": [str(heldout)], "eval_samples": 2, **(data or {})}
    data_lines = "\n".join(f"  {k}: {v if isinstance(v, (str, Path)) else json.dumps(v)}" for k, v in data.items())
    path.write_text(
        f"""seed_everything: 0
trainer:
  logger: false
  enable_checkpointing: false
  callbacks:
    - class_path: lightning_mka.callbacks.MergeCallback
      init_args:
{lines}
model:
  model: {model_dir}
data:
{data_lines}
"""
    )
    return path


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A saved tiny Llama (6 layers) with its tokenizer, loadable by name like any HF dir."""
    out = tmp_path / "tiny-llama"
    tiny_model("llama", layers=6).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def tiny_heldout(tmp_path) -> Path:
    return write_corpus(tmp_path / "heldout.txt", documents=20, seed=1)
