"""Quantization of a (merged) model through transformers' ``BitsAndBytesConfig`` (no Lightning).

Quantizing happens AFTER merging, from an exported fp32/bf16 directory: bitsandbytes replaces ``nn.Linear`` modules,
and merging needs plain float weights. ``int8`` is LLM.int8 (``load_in_8bit``), ``nf4`` is 4-bit NormalFloat with
double quantization. On CPU, transformers loads them with ``device_map="cpu"`` (bitsandbytes >= 0.45 has CPU kernels).

On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks every 4-bit weight for its fused CPU kernel on the first
inference forward (``Linear4bit.forward`` -> ``_convert_weight_packed_for_cpu``). That layout needs each linear layer's
input width to be a multiple of the quantization block (64) and its output width a multiple of the kernel's row tile
(32); other widths fail deep inside the forward. ``check_quantizable`` refuses such a model before any work, following
bitsandbytes' own decision (``bitsandbytes.nn.modules.has_avx512bf16``, read when each ``Linear4bit`` is built).
LLM.int8 on CPU has no width requirement.
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


def bitsandbytes_config(mode: str, compute_dtype: torch.dtype = torch.float32, skip: list[str] | None = None):
    """transformers' config for ``mode``; ``skip``: the complete list of modules kept in float (``skip_list``)."""
    from transformers import BitsAndBytesConfig

    check_quant_mode(mode)
    require_bitsandbytes(mode)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=skip)


def cpu_packs_4bit_weights() -> bool:
    """Whether bitsandbytes will repack 4-bit weights for its AVX512-BF16 CPU kernel (its own test, not ours)."""
    from bitsandbytes.nn import modules

    return bool(modules.has_avx512bf16())


def packed_4bit_tiles() -> tuple[int, int]:
    """(input multiple, output multiple) that bitsandbytes' packed CPU layout needs: the 4-bit block size and the
    row tile of ``_convert_weight_packed_for_cpu``, read from bitsandbytes itself."""
    import inspect

    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    block = bnb.nn.Params4bit(torch.empty(0), requires_grad=False).blocksize
    rows = inspect.signature(_convert_weight_packed_for_cpu).parameters["block_n"].default
    return int(block), int(rows)


def fits_packed_4bit(width_in: int, width_out: int) -> bool:
    """Whether a linear layer of these widths can take bitsandbytes' packed 4-bit CPU layout."""
    block, rows = packed_4bit_tiles()
    return width_in % block == 0 and width_out % rows == 0


def skip_list(model: nn.Module, skip_modules: list[str] | None) -> list[str] | None:
    """``llm_int8_skip_modules`` for ``skip_modules`` (transformers' name matching: a suffix, a prefix or a regex).

    transformers drops its default skips (output embedding, tied weights, the last module) as soon as a list is
    given, so they are added back; None keeps transformers' defaults alone.
    """
    from transformers.quantizers.base import get_keys_to_not_convert

    return None if not skip_modules else [*get_keys_to_not_convert(model), *skip_modules]


def quantized_linear_shapes(model: nn.Module, skip_modules: list[str] | None = None) -> list[tuple[str, int, int]]:
    """``(name, in_features, out_features)`` of every linear layer transformers would replace by a bitsandbytes layer,
    by transformers' own rules (``HfQuantizer.get_modules_to_not_convert``, ``should_convert_module``)."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = skip_list(model, skip_modules)
    not_converted = HfQuantizer.get_modules_to_not_convert(model, skip, getattr(model, "_keep_in_fp32_modules", None))
    return [
        (name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, not_converted)
    ]


def check_quantizable(model: nn.Module, mode: str, device: str = "cpu", skip_modules: list[str] | None = None) -> None:
    """Refuse, before any work, a model whose linear layers the chosen mode cannot run on this backend.

    ``model`` may live on the meta device (only module types and widths are read); ``device``: where the quantized
    model will run (``cpu`` or another device type).
    """
    check_quant_mode(mode)
    if mode != "nf4" or device != "cpu" or not cpu_packs_4bit_weights():
        return  # int8, and nf4 without the packed CPU layout, take any width
    block, rows = packed_4bit_tiles()
    for name, width_in, width_out in quantized_linear_shapes(model, skip_modules):
        if not fits_packed_4bit(width_in, width_out):
            raise MKAError(
                f"nf4 on this CPU (bitsandbytes packs 4-bit weights for its AVX512-BF16 kernel) needs every quantized linear layer's input "
                f"width to be a multiple of {block} and output width a multiple of {rows}, but {name} is {width_in} -> {width_out}; "
                f"use modes: [int8], or keep such layers in float with skip_modules (e.g. [{name.rsplit('.', 1)[-1]}])"
            )


def _meta_model(path: Path):
    """The model described by ``path/config.json``, built on the meta device (no weights, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def load_quantized(
    model_dir: str | os.PathLike, mode: str, compute_dtype: torch.dtype = torch.float32, device_map: str | dict = "cpu", skip_modules: list[str] | None = None
):
    """Load an exported model quantized to ``mode`` (a fresh quantized export or a float one).

    A float model whose layers ``mode`` cannot run on this backend is refused first (``check_quantizable``).
    """
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise MKAError(f"no model to quantize at {str(path)!r} (config.json missing); export the merged model first")
    require_bitsandbytes(mode)
    saved = _saved_quantization(path)
    meta = _meta_model(path)
    on_cpu = device_map == "cpu" or (isinstance(device_map, dict) and set(map(str, device_map.values())) == {"cpu"})
    check_quantizable(meta, mode, "cpu" if on_cpu else "other", saved.get("llm_int8_skip_modules") if saved else skip_modules)
    kwargs = {} if saved else {"quantization_config": bitsandbytes_config(mode, compute_dtype, skip_list(meta, skip_modules))}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=compute_dtype, **kwargs)
    except Exception as err:
        raise MKAError(f"loading {str(path)!r} as {mode} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); check bitsandbytes' CPU support") from None
    return model.eval()


def _saved_quantization(path: Path) -> dict | None:
    import json

    return json.loads((path / "config.json").read_text()).get("quantization_config")


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
