"""Quantization of a (merged) model through transformers' ``BitsAndBytesConfig`` (no Lightning).

Quantizing happens AFTER merging, from an exported fp32/bf16 directory: bitsandbytes replaces ``nn.Linear`` modules,
and merging needs plain float weights. ``int8`` is LLM.int8 (``load_in_8bit``), ``nf4`` is 4-bit NormalFloat with
double quantization. On CPU, transformers loads them with ``device_map="cpu"`` (bitsandbytes >= 0.45 has CPU kernels).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lightning_mka.errors import MKAError

QUANT_MODES = ("int8", "nf4")
# LLM.int8 computes in float16 and says so on every matmul; once in the docs is enough.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
logging.getLogger("bitsandbytes.autograd._functions").addFilter(lambda record: "inputs will be cast" not in record.getMessage())


def check_quant_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise MKAError(f"unknown quantization {mode!r}; use one of {', '.join(QUANT_MODES)}")
    return mode


def require_bitsandbytes(mode: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a broken native library
        raise MKAError(f"quantization {mode} needs bitsandbytes ({type(err).__name__}: {err}); pip install bitsandbytes") from None


def bitsandbytes_config(mode: str, compute_dtype: torch.dtype = torch.float32):
    from transformers import BitsAndBytesConfig

    check_quant_mode(mode)
    require_bitsandbytes(mode)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)


def load_quantized(model_dir: str | os.PathLike, mode: str, compute_dtype: torch.dtype = torch.float32, device_map: str = "cpu"):
    """Load an exported model quantized to ``mode`` (a fresh quantized export or a float one)."""
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise MKAError(f"no model to quantize at {str(path)!r} (config.json missing); export the merged model first")
    config = bitsandbytes_config(mode, compute_dtype)
    already = _saved_quantization(path)
    kwargs = {} if already else {"quantization_config": config}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=compute_dtype, **kwargs)
    except Exception as err:
        raise MKAError(f"loading {str(path)!r} as {mode} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); check bitsandbytes' CPU support") from None
    return model.eval()


def _saved_quantization(path: Path) -> bool:
    import json

    config = json.loads((path / "config.json").read_text())
    return "quantization_config" in config


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers in memory (quantized tensors count at their packed size)."""
    seen = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    # 4-bit and 8-bit layers keep their scales outside parameters: count them too.
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for name in ("absmax", "code"):
                t = getattr(state, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
            nested = getattr(state, "state2", None)
            if nested is not None and isinstance(getattr(nested, "absmax", None), torch.Tensor):
                total += nested.absmax.numel() * nested.absmax.element_size()
        scb = getattr(getattr(module, "weight", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def directory_bytes(path: str | os.PathLike, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern))
