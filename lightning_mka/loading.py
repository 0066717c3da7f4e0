"""Load a causal LM and its tokenizer from an asset name, a local HF dir, a ``.gguf`` file or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_mka.assets import ASSETS, MODEL_ASSETS, asset_path
from lightning_mka.errors import MKAError, first_line
from lightning_mka.files import check_gguf, check_model_dir
from lightning_mka.signals import set_phase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise MKAError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _looks_like_path(source: str) -> bool:
    """A source that can only be meant as a local path: absolute or relative markers, a ``.gguf`` file, or more than
    the one slash of a hub id ``org/name`` (``runs/exports/my-model``)."""
    return source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf") or source.count("/") > 1


def _read_as_hub_id(source: str) -> bool:
    """``org/name`` with no such local path: ``resolve_model_source`` handed it to the hub."""
    return source not in ASSETS and "/" in source and not Path(source).expanduser().exists()


def _not_local(source: str) -> str:
    """For a hub id that failed to load: say that no local path of that name exists either (``exports/my-model``
    with a typo is read as a hub id)."""
    first = source.split("/", 1)[0]
    return f"no local path {source!r} exists" + (f" (the directory {first!r} does)" if Path(first).is_dir() else "")


def resolve_model_source(source: str) -> tuple[str, dict]:
    """Map a model argument to ``(path_or_id, extra from_pretrained kwargs)``, with one-line errors."""
    if not source or not isinstance(source, str):
        raise MKAError(f"model must be an asset name ({', '.join(MODEL_ASSETS)}), a local path or a hub id, got {source!r}")
    if source in ASSETS:
        if source not in MODEL_ASSETS:
            raise MKAError(f"asset {source!r} is data, not a model; model assets: {', '.join(MODEL_ASSETS)}")
        return str(asset_path(source)), {}
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise MKAError(f"model file {source!r} is not a .gguf file; pass a .gguf file or an HF model directory")
            check_gguf(path)
            return str(path.parent), {"gguf_file": path.name}
        if not (path / "config.json").exists():
            raise MKAError(f"model directory {source!r} has no config.json; pass a directory written by save_pretrained")
        check_model_dir(path)
        return str(path), {}
    if _looks_like_path(source):
        raise MKAError(f"model path {source!r} does not exist; pass an existing HF dir or .gguf file, or an asset name ({', '.join(MODEL_ASSETS)})")
    if "/" not in source:
        raise MKAError(f"unknown asset {source!r}; known model assets: {', '.join(MODEL_ASSETS)} (or pass a local path or a hub id org/name)")
    return source, {}  # a hub id, for users who can reach a hub


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    where, extra = resolve_model_source(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    except (OSError, ValueError) as err:
        where_from = f"the hub id {source!r}; {_not_local(source)}" if _read_as_hub_id(source) else repr(source)
        raise MKAError(f"cannot load a tokenizer from {where_from} ({first_line(err)}); check the path or hub id") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_failed(source: str, err: BaseException) -> MKAError:
    """Corrupt or truncated model files surface as OSError, SafetensorError, struct / gguf errors...: one line. A hub
    id that failed (unreachable hub, a typo in a local path read as ``org/name``) says so instead."""
    if _read_as_hub_id(source):
        return MKAError(f"cannot load model {source!r} as a hub id ({type(err).__name__}: {first_line(err)}); {_not_local(source)}: check the path, "
                        "or the hub id and the connection")
    return MKAError(f"cannot load model {source!r} ({type(err).__name__}: {first_line(err)}); check that the files are complete, or re-export them")


def load_model(source: str, dtype: str = "float32"):
    """The causal LM, in eval mode, on CPU, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    set_phase(f"loading model {source}")
    where, extra = resolve_model_source(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=parse_dtype(dtype), **extra)
    except MKAError:
        raise
    except Exception as err:
        raise load_failed(source, err) from None
    if getattr(model, "hf_quantizer", None) is not None and extra.get("gguf_file"):
        model.hf_quantizer = None  # GGUF is dequantized on load; the weights are plain floats
    model.eval()
    return model


def load_model_executed(source: str, dtype: str = "float32", execution: str = "whole", offload: str | None = None, offload_dir: str | None = None):
    """``load_model`` under an execution mode (``lightning_mka.execution``).

    ``whole``: the plain model. ``layerwise`` with ``offload: cpu``: the model loaded on CPU, run one unit at a time
    on the compute device. ``offload: disk``: no weight is loaded at all; the parameters are read from the model's
    safetensors as each unit runs, so the model must be a local directory with safetensors files.
    """
    from lightning_mka.execution import LayerwiseExecutor, check_execution, load_skeleton

    execution, offload = check_execution(execution, offload)
    if execution == "whole":
        return load_model(source, dtype)
    if offload == "cpu":
        model = load_model(source, dtype)
        LayerwiseExecutor(model, "cpu")
        return model
    gguf = str(source).lower().endswith(".gguf")  # refused by its name, before the file is read
    where, extra = (source, {}) if gguf else resolve_model_source(source)
    if gguf or extra.get("gguf_file") or not Path(where).is_dir():
        what = "a .gguf file" if gguf or extra.get("gguf_file") else "a hub id"
        raise MKAError(f"offload: disk reads weights from a local safetensors directory, and {source!r} is {what}; convert it once with save_pretrained (or use offload: cpu)")
    try:
        model, index = load_skeleton(where, parse_dtype(dtype))
    except MKAError:
        raise
    except Exception as err:
        raise load_failed(source, err) from None
    LayerwiseExecutor(model, "disk", index, scratch_dir=offload_dir)
    return model


def context_length(config) -> int | None:
    """The positions a model was trained on (``max_position_embeddings`` of its text config), if it says."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    length = getattr(text, "max_position_embeddings", None)
    return int(length) if isinstance(length, int) and length > 0 else None


def check_seq_len(seq_len: int, config) -> None:
    """Sequences longer than the model's context would calibrate and evaluate on positions it never saw (or fail in
    its position embeddings): refuse them."""
    length = context_length(config)
    if length is not None and seq_len > length:
        raise MKAError(f"data.seq_len={seq_len} exceeds the model's context of {length} tokens (max_position_embeddings); set data.seq_len <= {length}")

