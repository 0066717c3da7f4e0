"""Every file the tool reads, read through one validated loader (no Lightning here).

A damaged file (truncated, garbage, empty, wrong schema, wrong encoding) is refused with one ``MKAError`` line that
names the file, the fault and the fix, before any long work depends on it: the progress file and a checkpoint are
checked before the dense validation runs, a model directory and a GGUF file before ``from_pretrained`` reads them, a
YAML config before the parser, calibration files before they are tokenized.

    read_json(path, what, fix)            JSON (progress file, config.json, indexes), optionally with a schema check
    read_progress(path)                   the resume file ``<export_dir>.mka-progress.json``
    check_yaml_config(path)               a ``--config`` file: UTF-8, YAML, a mapping
    check_checkpoint(path)                a Lightning checkpoint (``fit --ckpt_path``): a complete torch zip archive
    check_safetensors(path)               header length, JSON header, every tensor inside the file
    check_gguf(path)                      magic, version, counts
    check_model_dir(path)                 config.json, weights (safetensors or an index), tokenizer JSON files
    check_text_file(path)                 calibration / evaluation text: not binary, UTF-8
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_mka.errors import MKAError, first_line

PROGRESS_FIX = "delete it to start over, or set resume: false"
TEXT_SNIFF_BYTES = 1 << 20  # bytes of a text file checked for binary content and encoding before it is streamed


def _name(path: str | os.PathLike) -> str:
    return repr(str(path))


def _read_bytes(path: Path, what: str, fix: str) -> bytes:
    if not path.exists():
        raise MKAError(f"{what} {_name(path)} does not exist; {fix}")
    if path.is_dir():
        raise MKAError(f"{what} {_name(path)} is a directory, not a file; {fix}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise MKAError(f"{what} {_name(path)} cannot be read ({err.strerror or err}); {fix}") from None
    if not data.strip():
        raise MKAError(f"{what} {_name(path)} is empty; {fix}")
    return data


def _decode(data: bytes, path: Path, what: str, fix: str) -> str:
    if b"\0" in data[:TEXT_SNIFF_BYTES]:
        raise MKAError(f"{what} {_name(path)} is binary, not text (a NUL byte at offset {data.index(0)}); {fix}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MKAError(f"{what} {_name(path)} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); {fix}") from None


def read_json(path: str | os.PathLike, what: str, fix: str, schema: Callable[[Any], str | None] | None = None) -> Any:
    """The JSON value in ``path``; ``schema(value)`` returns a problem (a short phrase) or None."""
    path = Path(path)
    text = _decode(_read_bytes(path, what, fix), path, what, fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        cut = err.pos >= len(text.rstrip()) or (err.msg.startswith("Unterminated string") and "\n" not in text[err.pos:].rstrip())
        fault = "is truncated" if cut else "is not valid JSON"
        raise MKAError(f"{what} {_name(path)} {fault} (line {err.lineno}, column {err.colno}: {err.msg}); {fix}") from None
    problem = schema(value) if schema is not None else None
    if problem:
        raise MKAError(f"{what} {_name(path)} has the wrong content ({problem}); {fix}")
    return value


# ---- the progress file ------------------------------------------------------------------------------------------


def progress_problem(value: Any, fields: tuple[set[str], set[str]] | None = None) -> str | None:
    """What is wrong with a progress file's content (None: usable). ``fields``: the (required, optional) keys of a
    step."""
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__}, expected an object with 'fingerprint' and 'steps'"
    missing = [key for key in ("fingerprint", "steps") if key not in value]
    if missing:
        return f"no {' or '.join(repr(m) for m in missing)}"
    if not isinstance(value["fingerprint"], str) or len(value["fingerprint"]) != 64:
        return "'fingerprint' is not a sha256 hex string"
    steps = value["steps"]
    if not isinstance(steps, list):
        return "'steps' is not a list"
    depth = None
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            return f"step {i + 1} is not an object"
        if step.get("step") != i + 1:
            return f"step {i + 1} is numbered {step.get('step')!r}"
        if fields is not None:
            missing = sorted(fields[0] - set(step))
            unknown = sorted(set(step) - fields[0] - fields[1])
            if missing or unknown:
                return f"step {i + 1} lacks {missing}" if missing else f"step {i + 1} has unknown keys {unknown}"
        after = step.get("depth_after")
        if not isinstance(after, int) or after < 1 or (depth is not None and after != depth - 1):
            return f"step {i + 1} has depth_after {after!r}"
        pair = step.get("pair")
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, int) for p in pair) and 0 <= pair[0] < pair[1] <= after):
            return f"step {i + 1} has no valid 'pair' ({pair!r})"
        depth = after
    return None


def read_progress(path: str | os.PathLike) -> dict:
    """The resume file, checked: JSON object, sha256 fingerprint, steps numbered 1..n, depth falling by one."""
    import dataclasses

    from lightning_mka.merging import MergeStep

    required = {f.name for f in dataclasses.fields(MergeStep) if f.default is dataclasses.MISSING}
    optional = {f.name for f in dataclasses.fields(MergeStep)} - required
    return read_json(path, "progress file", PROGRESS_FIX, lambda value: progress_problem(value, (required, optional)))


# ---- YAML config ------------------------------------------------------------------------------------------------


def check_yaml_config(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    fix = "fix the file, or write a fresh one with `lightning-mka fit --print_config > my.yaml`"
    text = _decode(_read_bytes(path, "config file", fix), path, "config file", fix)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise MKAError(f"config file {_name(path)} is not valid YAML ({where}{problem}); {fix}") from None
    if not isinstance(value, dict):
        raise MKAError(f"config file {_name(path)} holds a YAML {type(value).__name__}, not a mapping of options; {fix}")
    return value


def config_paths(args: list[str]) -> list[str]:
    """The ``--config`` files named on a command line (``--config X`` and ``--config=X``)."""
    paths = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


# ---- checkpoints ------------------------------------------------------------------------------------------------


CHECKPOINT_FIX = "pass another checkpoint (e.g. an earlier epoch's), or drop --ckpt_path to start over"


def check_checkpoint(path: str | os.PathLike, model: str | None = None) -> dict:
    """A Lightning checkpoint, checked before any model loads: a complete torch zip archive (every member's CRC),
    holding a ``state_dict``; with ``model``, written for that model. Returns the checkpoint (memory-mapped)."""
    import torch

    path = Path(path)
    _read_head(path, "checkpoint", CHECKPOINT_FIX)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as err:
        raise MKAError(f"checkpoint {_name(path)} is truncated or not a torch checkpoint ({err}); {CHECKPOINT_FIX}") from None
    if bad is not None:
        raise MKAError(f"checkpoint {_name(path)} is damaged (member {bad!r} fails its CRC); {CHECKPOINT_FIX}")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        raise MKAError(f"checkpoint {_name(path)} cannot be read ({type(err).__name__}: {first_line(err)}); {CHECKPOINT_FIX}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise MKAError(f"checkpoint {_name(path)} has the wrong content (no Lightning 'state_dict'; a plain weights file?); {CHECKPOINT_FIX}")
    plan = checkpoint.get("mka_merge_plan", [])
    if not isinstance(plan, list) or not all(isinstance(s, dict) for s in plan):
        raise MKAError(f"checkpoint {_name(path)} has the wrong content ('mka_merge_plan' is not a list of steps); {CHECKPOINT_FIX}")
    written_for = (checkpoint.get("hyper_parameters") or {}).get("model")
    if model is not None and written_for is not None and str(written_for) != str(model):
        raise MKAError(f"checkpoint {_name(path)} was written for model {written_for!r}, not {model!r}; pass the same --model.model, or another checkpoint")
    return checkpoint


def _read_head(path: Path, what: str, fix: str, size: int = 64) -> bytes:
    if not path.exists():
        raise MKAError(f"{what} {_name(path)} does not exist; {fix}")
    if not path.is_file():
        raise MKAError(f"{what} {_name(path)} is not a file; {fix}")
    if path.stat().st_size == 0:
        raise MKAError(f"{what} {_name(path)} is empty; {fix}")
    with open(path, "rb") as f:
        return f.read(size)


# ---- model files ------------------------------------------------------------------------------------------------


MODEL_FIX = "re-export the model, or fetch it again"


def check_safetensors(path: str | os.PathLike, fix: str = MODEL_FIX) -> dict:
    """The safetensors header, checked like the format's own loader does before reading: an 8-byte length, a JSON
    header of that length, every tensor's byte range inside the file. Returns the header."""
    path = Path(path)
    head = _read_head(path, "weights file", fix, 8)
    size = path.stat().st_size
    if len(head) < 8:
        raise MKAError(f"weights file {_name(path)} is truncated ({size} bytes, shorter than its header); {fix}")
    (length,) = struct.unpack("<Q", head)
    if length > min(size - 8, 100 << 20):
        raise MKAError(f"weights file {_name(path)} is truncated or not safetensors (header of {length} bytes in a file of {size}); {fix}")
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MKAError(f"weights file {_name(path)} is not safetensors (its header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise MKAError(f"weights file {_name(path)} is not safetensors (its header is not an object); {fix}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise MKAError(f"weights file {_name(path)} has the wrong content (tensor {name!r} has no data_offsets); {fix}")
        end = max(end, int(offsets[1]))
    if 8 + length + end != size:
        fault = "is truncated" if 8 + length + end > size else "has trailing bytes"
        raise MKAError(f"weights file {_name(path)} {fault} ({size} bytes, its header describes {8 + length + end}); {fix}")
    return header


GGUF_MAGIC = b"GGUF"


def check_gguf(path: str | os.PathLike, fix: str = "download the .gguf file again") -> None:
    """A GGUF file's fixed header: magic, a known version, plausible tensor and metadata counts."""
    path = Path(path)
    head = _read_head(path, "GGUF file", fix, 24)
    if len(head) < 24:
        raise MKAError(f"GGUF file {_name(path)} is truncated ({len(head)} bytes); {fix}")
    if head[:4] != GGUF_MAGIC:
        raise MKAError(f"GGUF file {_name(path)} is not GGUF (starts with {head[:4]!r}, expected b'GGUF'); {fix}")
    version, tensors, metadata = struct.unpack("<IQQ", head[4:24])
    if version not in (1, 2, 3) or tensors > 1 << 20 or metadata > 1 << 20:
        raise MKAError(f"GGUF file {_name(path)} has a damaged header (version {version}, {tensors} tensors, {metadata} metadata keys); {fix}")
    try:
        from gguf import GGUFReader
    except ImportError:
        return
    try:  # memory-mapped: parses the metadata and tensor table, checks every tensor lies inside the file
        GGUFReader(path)
    except Exception as err:
        raise MKAError(f"GGUF file {_name(path)} is truncated or damaged ({first_line(err, 160)}); {fix}") from None


def _config_problem(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__}, expected an object"
    if "model_type" not in value:
        return "no 'model_type'"
    return None


def check_model_dir(path: str | os.PathLike, fix: str = MODEL_FIX) -> dict:
    """An HF model directory before ``from_pretrained``: config.json, the weights (one safetensors file, or an
    index and every shard it names) and the tokenizer's JSON files. Returns config.json."""
    path = Path(path)
    config = read_json(path / "config.json", "model config", fix, _config_problem)
    index = path / "model.safetensors.index.json"
    if index.exists():
        value = read_json(index, "weights index", fix, lambda v: None if isinstance(v, dict) and isinstance(v.get("weight_map"), dict) else "no 'weight_map'")
        for shard in sorted(set(value["weight_map"].values())):
            check_safetensors(path / shard, fix)
    elif (path / "model.safetensors").exists():
        check_safetensors(path / "model.safetensors", fix)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (path / name).exists():
            read_json(path / name, "model file", fix)
    return config


# ---- text -------------------------------------------------------------------------------------------------------


def check_text_file(path: str | os.PathLike, what: str = "data file", fix: str = "pass UTF-8 text (.txt) or JSON lines (.jsonl)") -> None:
    """The start of a text source: not binary (no NUL byte), UTF-8 (a character cut at the sniff's end is fine)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return
    with open(path, "rb") as f:
        data = f.read(TEXT_SNIFF_BYTES)
    if not data.strip():
        raise MKAError(f"{what} {_name(path)} is empty; {fix}")
    if b"\0" in data:
        raise MKAError(f"{what} {_name(path)} is binary, not text (a NUL byte at offset {data.index(0)}); {fix}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(data) - 4:
            raise MKAError(f"{what} {_name(path)} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); re-encode it as UTF-8 (e.g. iconv -t utf-8)") from None
