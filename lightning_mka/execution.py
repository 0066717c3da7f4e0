"""Where the weights live while the model runs: the whole model on the device, or one decoder layer at a time.

``execution: whole`` (default) is the plain model: every weight on the compute device, nothing hooked.

``execution: layerwise`` keeps the model's own forward (so position embeddings, masks, sliding / full attention
per ``layer_types`` and the KV cache are computed exactly as Hugging Face does) but onloads one *unit* at a time
onto the compute device: a pre-forward hook loads the unit's weights, a post-forward hook puts them back. A unit is
a decoder layer, or a top-level module with weights of its own (embeddings, final norm, head). Only the unit that
is running sits on the compute device. At rest the weights are

- ``offload: cpu``: in CPU memory (on a CPU-only machine onloading is then a no-op);
- ``offload: disk``: nowhere: the parameters are ``meta`` tensors and each onload reads the unit's tensors from the
  model's safetensors files (``SafetensorsIndex``: the header is parsed once, every read is a ``pread`` of one
  tensor's bytes, so the whole file is never mapped or held). A layer that surgery changes is materialized on CPU
  for the surgery, then written to a scratch safetensors file (``spill``) and released, so memory stays flat as
  merges accumulate. The export streams every tensor from its file into the new checkpoint, one at a time.

Everything that runs the model asks ``compute_device(model)`` for the device, and ``executor_of(model).sync()``
before a pass (new layers built by merges become units). Pure torch / safetensors format, no Lightning.
"""

from __future__ import annotations

import json
import os
import struct
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lightning_mka.errors import MKAError
from lightning_mka.signals import process_temp_dir

EXECUTIONS = ("whole", "layerwise")
SCRATCH_PREFIX = "mka-offload-"  # scratch dirs of merged layers under offload: disk: mka-offload-pid<N>-...
OFFLOADS = ("none", "cpu", "disk")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def check_execution(execution: str, offload: str | None) -> tuple[str, str]:
    """Validate the pair; ``offload=None`` means ``none`` for ``whole`` and ``cpu`` for ``layerwise``."""
    if execution not in EXECUTIONS:
        raise MKAError(f"unknown execution {execution!r}; use one of {', '.join(EXECUTIONS)}")
    if offload is None:
        offload = "cpu" if execution == "layerwise" else "none"
    if offload not in OFFLOADS:
        raise MKAError(f"unknown offload {offload!r}; use one of {', '.join(OFFLOADS)}")
    if execution == "whole" and offload != "none":
        raise MKAError(f"offload: {offload} keeps weights off the device between layers; it needs execution: layerwise")
    if execution == "layerwise" and offload == "none":
        raise MKAError("offload: none keeps every weight on the device, which is execution: whole; under execution: layerwise use offload: cpu or disk")
    return execution, offload


# ---- safetensors, read and written one tensor at a time ------------------------------------------------------------


class SafetensorsIndex:
    """Every tensor of a model directory's ``*.safetensors`` files (sharded or not), read on demand.

    Only the headers are parsed up front; ``read(name)`` reads that tensor's bytes with ``pread`` into a fresh
    tensor, so nothing is mapped and the process holds only what it asked for.
    """

    def __init__(self, files: list[Path]) -> None:
        self.entries: dict[str, tuple[int, torch.dtype, tuple[int, ...], int, int]] = {}
        self._fds: list[int] = []
        self.files = [Path(f) for f in files]
        for number, path in enumerate(self.files):
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            base = 8 + size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise MKAError(f"{path}: tensor {name!r} has dtype {info['dtype']} that disk offload cannot read")
                start, end = info["data_offsets"]
                self.entries[name] = (number, _DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + end)
            self._fds.append(os.open(path, os.O_RDONLY))

    @classmethod
    def of_directory(cls, directory: str | os.PathLike) -> SafetensorsIndex:
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise MKAError(f"offload: disk reads weights from the model's safetensors, and {str(directory)!r} has none; re-save the model with save_pretrained (safetensors) or use offload: cpu")
        return cls(files)

    def __deepcopy__(self, memo) -> SafetensorsIndex:
        return self  # file handles are shared, never duplicated (a copy would close them when collected)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str) -> torch.Tensor:
        number, dtype, shape, start, end = self.entries[name]
        out = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(out.numpy())
        done = 0
        while done < end - start:
            got = os.preadv(self._fds[number], [view[done:]], start + done)
            if got <= 0:
                raise MKAError(f"{self.files[number]}: unexpected end of file reading {name!r}; the checkpoint is truncated")
            done += got
        return out.view(dtype).reshape(shape)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __del__(self) -> None:  # noqa: D105
        try:
            self.close()
        except Exception:
            pass


def write_safetensors(path: str | os.PathLike, tensors: list[tuple[str, torch.dtype, tuple[int, ...], object]], metadata: dict | None = None) -> None:
    """Write a safetensors file one tensor at a time: ``tensors`` holds ``(name, dtype, shape, get)`` with ``get()``
    returning the tensor (read lazily, written, dropped). Names are sorted, as ``safetensors`` writes them."""
    tensors = sorted(tensors, key=lambda t: t[0])
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape, _ in tensors:
        nbytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, get in tensors:
            tensor = get().detach().to("cpu").contiguous()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{name}: expected {dtype} {tuple(shape)}, got {tensor.dtype} {tuple(tensor.shape)}")
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor  # before the next one is read: one tensor in memory at a time


# ---- a model whose parameters are never allocated ------------------------------------------------------------------


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While building a model, every parameter goes to the ``meta`` device as it is registered (buffers, e.g.
    rotary frequencies and embedding scales, stay real): no weight memory is allocated or initialised."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_skeleton(directory: str, dtype: torch.dtype) -> tuple[nn.Module, SafetensorsIndex]:
    """The causal LM of ``directory`` with every parameter on ``meta``, and the index of its safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers import GenerationConfig

    index = SafetensorsIndex.of_directory(directory)
    config = AutoConfig.from_pretrained(directory)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (Path(directory) / "generation_config.json").exists():  # from_config knows only the config's defaults
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.eval()
    return model, index


def fixed_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """Ask glibc to serve every allocation above ``threshold`` bytes with its own ``mmap`` (returned to the OS on
    free). By default glibc raises that threshold each time a large block is freed, after which layer-sized tensors
    come from the heap and a freed layer's memory stays in the process: loading one layer after another then grows
    the RSS with the depth (bench/results/scale.md, 32-layer 0.43B model, layer-wise + disk: 1.15 GB peak with
    neither this nor ``malloc_trim``, 1.06 GB with this only, 0.73 GB with both). A no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _libc_trim():
    """``malloc_trim(0)`` (glibc: give free heap pages back to the OS), or a no-op."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


# ---- executors -----------------------------------------------------------------------------------------------------


class WholeExecutor:
    """Today's behaviour: the model as it is, on whatever device its parameters are."""

    layerwise = False
    offload = "none"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sync(self) -> None:
        pass

    def settle(self) -> None:
        pass

    @contextmanager
    def held(self, module: nn.Module) -> Iterator[None]:
        yield

    def cache(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().clone()

    @contextmanager
    def materialized(self, *modules: nn.Module) -> Iterator[None]:
        yield

    def spill(self, module: nn.Module) -> None:
        pass

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.model.save_pretrained(directory)

    def materialized_bytes(self) -> int:
        """Bytes of parameters that are real tensors right now (not ``meta``; ``parameters()`` lists tied ones once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.device.type != "meta")


class _Unit:
    """One onloadable module: its own parameters (by owner module and name) and where they rest."""

    def __deepcopy__(self, memo) -> None:
        return None  # a deep copy of a layer (surgery builds merged layers that way) is a new module, adopted anew

    def __init__(self, module: nn.Module) -> None:
        # Weak: the module holds its unit (and its hooks hold it too), so a strong reference back would be a cycle that
        # keeps a layer removed by a merge, weights and open spill files included, alive until a full collection.
        self._module = weakref.ref(module)
        self.disk: dict[tuple[nn.Module, str], tuple[SafetensorsIndex, str, nn.Parameter]] | None = None  # -> (index, key, meta param)
        self.saved: dict[tuple[nn.Module, str], nn.Parameter] | None = None  # at-rest params while onloaded
        self.pins = 0
        self.hold = False  # stays onloaded across forwards (layer-major passes)

    @property
    def module(self) -> nn.Module:
        module = self._module()
        assert module is not None, "a unit outlived its module"
        return module

    def params(self) -> list[tuple[nn.Module, str]]:
        return [(owner, name) for owner in self.module.modules() for name, p in owner._parameters.items() if p is not None]


class _Hook:
    """Onload / offload hook (a class, so the executor can recognise its hooks on a deep copy). It acts on the unit of
    the module it is called on, never a unit of its own: a deep copy (a merged layer) carries its original's hooks, and
    its original may be gone. A copy run before the executor adopted it is adopted then."""

    def __init__(self, action) -> None:
        self.action = action  # the executor's bound _onload / _offload

    def __call__(self, module, *_rest) -> None:
        unit = _unit_of(module)
        if unit is None:
            self.action.__self__.sync()
            unit = _unit_of(module)
        if unit is not None:
            self.action(unit)

    def __deepcopy__(self, memo) -> _Hook:
        return self


class LayerwiseExecutor(WholeExecutor):
    """One unit at a time on ``device``; see the module docstring.

    Args:
        model: the causal LM; with ``offload: disk`` built by ``load_skeleton`` (parameters on ``meta``).
        offload: ``cpu`` | ``disk``.
        index: the safetensors the meta parameters are read from (``disk``).
        scratch_dir: where spilled (merged) layers are written (``disk``); default: a temporary directory. Either
            way the run's own scratch directory in it is removed when the executor is collected or the process exits.
    """

    layerwise = True

    def __init__(self, model: nn.Module, offload: str = "cpu", index: SafetensorsIndex | None = None, scratch_dir: str | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__(model)
        if offload not in ("cpu", "disk"):
            raise MKAError(f"unknown offload {offload!r} for execution: layerwise; use cpu or disk")
        if offload == "disk" and index is None:
            raise ValueError("offload: disk needs the model's SafetensorsIndex")
        self.offload = offload
        self.index = index
        self._device = torch.device(device)
        self._scratch_root = scratch_dir
        self._scratch_dir = None  # a TemporaryDirectory, made at the first spill
        self._spilled = 0
        self.onloads = 0  # how many unit onloads happened (tests / benchmarks)
        self.peak_onloaded = 0  # most units on the compute device at once
        self._active: list[_Unit] = []
        model._mka_executor = self
        getattr(model, "model", model)._mka_executor = self
        fixed_mmap_threshold()  # freed layers go back to the OS: memory stays flat as layers come and go
        self._trim = _libc_trim() if offload == "disk" else (lambda: None)
        for module in [*self._top_units(), *self._decoder()[1]]:
            self._adopt(module, from_disk=offload == "disk")

    # ---- which modules are units --------------------------------------------------------------------------------

    def _decoder(self) -> tuple[nn.Module, nn.ModuleList]:
        from lightning_mka.surgery import decoder_stack

        return decoder_stack(self.model)

    def _top_units(self) -> list[nn.Module]:
        """Modules outside the decoder layers that own parameters (embeddings, norm, head)."""
        _, layers = self._decoder()
        inside = {id(m) for layer in layers for m in layer.modules()}
        return [m for m in self.model.modules() if id(m) not in inside and any(p is not None for p in m._parameters.values())]

    def sync(self) -> None:
        """Make every decoder layer a unit (layers built by a merge arrive materialized on CPU)."""
        _, layers = self._decoder()
        for layer in layers:
            if _unit_of(layer) is None:
                self._adopt(layer, from_disk=False)

    def current_units(self) -> list[_Unit]:
        _, layers = self._decoder()
        return [u for u in (_unit_of(m) for m in [*self._top_units(), *layers]) if u is not None]

    def _adopt(self, module: nn.Module, from_disk: bool) -> None:
        unit = _Unit(module)
        if from_disk:
            assert self.index is not None
            unit.disk = {}
            names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
            ties = self._ties()
            for owner, pname in unit.params():
                param = owner._parameters[pname]
                name = names[id(param)]
                key = name if name in self.index else ties.get(name)
                if key is None or key not in self.index:
                    raise MKAError(f"offload: disk found no tensor {name!r} in the model's safetensors; re-save the model with save_pretrained or use offload: cpu")
                unit.disk[(owner, pname)] = (self.index, key, param)
        module.__dict__["_mka_unit"] = unit  # a plain attribute: the unit follows the module, not its position
        for hooks in (module._forward_pre_hooks, module._forward_hooks):  # a deep copy carries its original's hooks
            for key in [k for k, h in hooks.items() if isinstance(h, _Hook)]:
                del hooks[key]
        module.register_forward_pre_hook(_Hook(self._onload))
        module.register_forward_hook(_Hook(self._offload))

    def _ties(self) -> dict[str, str]:
        """Tied parameter names -> the name saved in the checkpoint (e.g. ``lm_head.weight`` -> the embeddings)."""
        groups: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        ties = {}
        for names in groups.values():
            saved = [n for n in names if self.index is not None and n in self.index]
            for n in names:
                if saved and n not in saved:
                    ties[n] = saved[0]
        return ties

    # ---- onload / offload -----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @device.setter
    def device(self, value: torch.device | str) -> None:
        self._device = torch.device(value)

    def _onload(self, unit: _Unit) -> None:
        if unit.saved is not None:  # already onloaded (a re-entrant call)
            return
        from_disk = unit.disk is not None and unit.pins == 0  # materialized (pinned): its real weights may be changed
        if not from_disk and all(owner._parameters[n].device == self._device for owner, n in unit.params()):
            return
        unit.saved = {}
        for owner, pname in unit.params():
            rest = owner._parameters[pname]
            unit.saved[(owner, pname)] = rest
            if from_disk:
                index, key, meta = unit.disk[(owner, pname)]
                value = index.read(key).to(device=self._device, dtype=meta.dtype)
            else:
                value = rest.detach().to(self._device)
            owner._parameters[pname] = nn.Parameter(value, requires_grad=False)
        self.onloads += 1
        self._active.append(unit)
        self.peak_onloaded = max(self.peak_onloaded, len(self._active))

    def _offload(self, unit: _Unit) -> None:
        if unit.saved is None or unit.hold:
            return
        for (owner, pname), rest in unit.saved.items():
            owner._parameters[pname] = rest
        unit.saved = None
        self._active.remove(unit)
        self._trim()

    def settle(self) -> None:
        """Offload every unit still onloaded (a forward stopped by an exception inside a layer skips its hook)."""
        for unit in list(self._active):
            self._offload(unit)

    @contextmanager
    def held(self, module: nn.Module) -> Iterator[None]:
        """Keep ``module`` onloaded for the whole block (one onload for many forwards: layer-major passes)."""
        self.sync()
        unit = _unit_of(module)
        assert unit is not None
        self._onload(unit)
        unit.hold = True
        try:
            yield
        finally:
            unit.hold = False
            self._offload(unit)

    # ---- surgery ------------------------------------------------------------------------------------------------

    @contextmanager
    def materialized(self, *modules: nn.Module) -> Iterator[None]:
        """The modules' weights as real CPU tensors for the block (surgery reads and writes them); disk-backed ones
        go back to disk afterwards unless ``spill`` gave them new contents meanwhile."""
        units = [u for u in (_unit_of(m) for m in modules) if u is not None]
        for unit in units:
            unit.pins += 1
            if unit.disk is not None and unit.pins == 1:
                for (owner, pname), (index, key, meta) in unit.disk.items():
                    owner._parameters[pname] = nn.Parameter(index.read(key).to(meta.dtype), requires_grad=False)
        try:
            yield
        finally:
            for unit in units:
                unit.pins -= 1
                if unit.disk is not None and unit.pins == 0:
                    for (owner, pname), (_index, _key, meta) in unit.disk.items():
                        owner._parameters[pname] = meta

    def spill(self, module: nn.Module) -> None:
        """A layer changed by surgery: with ``disk``, write it to a scratch safetensors file and release its memory."""
        self.sync()
        if self.offload != "disk":
            return
        unit = _unit_of(module)
        assert unit is not None
        params = unit.params()
        if any(owner._parameters[n].device.type == "meta" for owner, n in params) and unit.disk is not None and unit.pins == 0:
            return  # unchanged, still on disk
        if self._scratch_dir is None:
            # Named after this process, like every temp path of the tool: a run killed by SIGKILL skips every clean-up,
            # and the next one removes its merged layers (a 70B layer is 1.7 GB) instead of leaving them forever. Removed
            # by close(), when the executor is collected or, at the latest, at exit (the executor and its model refer
            # to each other, so collection may never come before the exit).
            self._scratch_dir = process_temp_dir(SCRATCH_PREFIX, self._scratch_root, fix="set offload_dir to a writable directory with room for the merged layers")
        self._spilled += 1
        path = Path(self._scratch_dir.name) / f"layer-{self._spilled:04d}.safetensors"
        keys = [f"{i}.{n}" for i, (_o, n) in enumerate(params)]
        tensors = [(k, owner._parameters[n].dtype, tuple(owner._parameters[n].shape), (lambda o=owner, n=n: o._parameters[n])) for k, (owner, n) in zip(keys, params)]
        write_safetensors(path, tensors)
        index = SafetensorsIndex([path])
        unit.disk = {}
        for key, (owner, pname) in zip(keys, params):
            real = owner._parameters[pname]
            meta = nn.Parameter(torch.empty(real.shape, dtype=real.dtype, device="meta"), requires_grad=False)
            unit.disk[(owner, pname)] = (index, key, meta)
            if unit.pins == 0:
                owner._parameters[pname] = meta
        # Spills no layer of the model reads any more (merged again, or merged away) are removed: a 70B run going
        # 80 -> 56 layers would otherwise keep every intermediate merge (1.7 GB each). Open handles still read them.
        live = {f for m in self.model.modules() if (u := _unit_of(m)) is not None and u.disk for index, _k, _m in u.disk.values() for f in index.files}
        for old in Path(self._scratch_dir.name).glob("layer-*.safetensors"):
            if old not in live:
                old.unlink(missing_ok=True)

    # ---- export ---------------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """``config.json`` (+ generation config) and one ``model.safetensors`` streamed tensor by tensor."""
        if self.offload != "disk":
            self.model.save_pretrained(directory)
            return
        self.sync()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.model.config
        config.architectures = [type(self.model).__name__]
        config.save_pretrained(directory)
        generation = getattr(self.model, "generation_config", None)
        if generation is not None and self.model.can_generate():
            generation.save_pretrained(directory)
        where: dict[int, tuple[_Unit, tuple[nn.Module, str]]] = {}
        for unit in self.current_units():
            for owner, pname in unit.params():
                where[id(owner._parameters[pname])] = (unit, (owner, pname))
        tensors = []
        for name, param in self.model.named_parameters():  # tied parameters once, under their first name
            unit, slot = where[id(param)]
            if unit.disk is not None and param.device.type == "meta":
                index, key, meta = unit.disk[slot]
                tensors.append((name, meta.dtype, tuple(meta.shape), lambda index=index, key=key, dtype=meta.dtype: index.read(key).to(dtype)))
            else:
                tensors.append((name, param.dtype, tuple(param.shape), lambda param=param: param))
        for name, buffer in self.model.state_dict(keep_vars=True).items():
            if name not in {t[0] for t in tensors} and not name.endswith(tuple(self._tied_suffixes())):
                tensors.append((name, buffer.dtype, tuple(buffer.shape), lambda buffer=buffer: buffer))
        write_safetensors(directory / "model.safetensors", tensors)

    def _tied_suffixes(self) -> list[str]:
        names = {n for n, _ in self.model.named_parameters()}
        return [n for n, _ in self.model.named_parameters(remove_duplicate=False) if n not in names]

    def cache(self, tensor: torch.Tensor) -> torch.Tensor:
        """Cached layer inputs live on CPU, one chunk per calibration batch."""
        return tensor.detach().to("cpu", copy=True)

    def __deepcopy__(self, memo) -> LayerwiseExecutor:
        return self

    def close(self) -> None:
        """Remove the scratch directory of spilled layers now (the model must not read them any more)."""
        if self._scratch_dir is not None:
            self._scratch_dir.cleanup()


def _unit_of(module: nn.Module) -> _Unit | None:
    return module.__dict__.get("_mka_unit")


def executor_of(model: nn.Module) -> WholeExecutor:
    executor = getattr(model, "_mka_executor", None)
    return executor if executor is not None else WholeExecutor(model)


def offloads_to_disk(model: nn.Module) -> bool:
    """Whether ``model``'s weights rest on disk (layer-wise execution, ``offload: disk``): its parameters are meta."""
    return getattr(executor_of(model), "offload", None) == "disk"


def compute_device(model: nn.Module) -> torch.device:
    """Where inputs go: the executor's device (layer-wise), else the device of the model's parameters."""
    return executor_of(model).device
