"""Collect every decoder layer's output at the manifold's points in ONE forward pass (no Lightning).

Points (``mode``):
  - ``tokens``: P token positions sampled once (seeded) from all non-padding positions of the calibration set,
    excluding position 0 (the attention sink, whose huge activations would dominate distances). The same positions
    are used for every layer, so layer embeddings are aligned point by point;
  - ``last``: the last non-padding token of each sequence; ``mean``: the masked mean over each sequence's tokens.

The collector can also keep each layer's *input* hidden states, so that after a merge at position ``s`` only
layers ``s..L-1`` are recomputed (the prefix is unchanged and is not run at all).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lightning_mka.errors import MKAError
from lightning_mka.execution import compute_device, executor_of
from lightning_mka.surgery import per_layer_config_keys

POINT_MODES = ("tokens", "last", "mean")


@dataclass(frozen=True)
class PointSpec:
    mode: str = "tokens"
    num_points: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in POINT_MODES:
            raise MKAError(f"unknown points mode {self.mode!r}; use one of {', '.join(POINT_MODES)}")
        if self.num_points < 2:
            raise MKAError(f"num_points must be >= 2, got {self.num_points}")


def sample_token_positions(lengths: torch.Tensor, num_points: int, seed: int) -> torch.Tensor:
    """``num_points`` distinct (sequence, position) pairs, uniform over positions ``1..length-1``, sorted.

    ``lengths`` holds the number of non-padding tokens of each calibration sequence (global, all ranks).
    """
    usable = (lengths - 1).clamp(min=0)
    total = int(usable.sum())
    if num_points > total:
        raise MKAError(
            f"num_points={num_points} exceeds the {total} usable calibration tokens; lower num_points or add calibration data"
        )
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(total, generator=generator)[:num_points].sort().values
    starts = torch.cumsum(usable, 0) - usable  # first flat index of each sequence
    seq = torch.searchsorted(torch.cumsum(usable, 0), flat, right=True)
    pos = flat - starts[seq] + 1  # +1: position 0 is never a point
    return torch.stack([seq, pos], dim=1)


def hidden_of(output) -> torch.Tensor:
    """A decoder layer's hidden state, whether it returns a tensor (new transformers) or a tuple (older)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def suffix_only(base_model: nn.Module, start: int, cached_input):
    """Make ``base_model`` run only decoder layers ``start..L-1``, feeding ``cached_input()`` to layer ``start``.

    The prefix is not run at all (its output is cached). Models read per-layer config lists (``layer_types``) by
    position in their loop, so those are shifted the same way for the duration.
    """
    if start == 0:
        yield
        return
    layers = base_model.layers
    config = base_model.config
    per_layer = {key: getattr(config, key) for key in per_layer_config_keys(config, len(layers))}

    def inject(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cached = cached_input().to(hidden.device)  # cached inputs may live on CPU (layer-wise execution)
        return ((cached, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": cached})

    handle = layers[start].register_forward_pre_hook(inject, with_kwargs=True, prepend=True)  # before any other hook
    base_model.layers = nn.ModuleList(list(layers)[start:])
    for key, value in per_layer.items():
        setattr(config, key, value[start:])
    try:
        yield
    finally:
        handle.remove()
        base_model.layers = layers
        for key, value in per_layer.items():
            setattr(config, key, value)


class _StopForward(Exception):
    pass


def call_body(base_model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, cached: torch.Tensor | None = None):
    """Run the transformer body on one batch. With ``cached`` (the first layer's input, inside ``suffix_only``) the
    embeddings are not looked up: it is passed as ``inputs_embeds``, from which the model builds the masks and
    position embeddings exactly as for ``input_ids``, and the inject hook hands the same tensor to the first layer."""
    mask = batch["attention_mask"].to(device)
    try:
        if cached is None:
            return base_model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
        return base_model(inputs_embeds=cached.to(device), attention_mask=mask, use_cache=False)
    finally:
        executor_of(base_model).settle()  # a pass stopped inside a layer leaves nothing onloaded


@torch.no_grad()
def run_through_layer(base_model: nn.Module, index: int, batches: Iterable[dict[str, torch.Tensor]], cached_inputs=None, on_batch=None) -> None:
    """Run calibration batches through the decoder layers up to and including ``index``, and no further.

    With ``cached_inputs`` (layer ``index``'s input per batch) only that one layer runs. ``on_batch(batch)`` is called
    before each batch, e.g. so hooks on the layer's modules know the attention mask.
    """

    def stop(_module, _args, _output):
        raise _StopForward

    start = index if cached_inputs is not None else 0
    state = {"batch": 0}
    executor_of(base_model).sync()
    handle = base_model.layers[index].register_forward_hook(stop)
    device = compute_device(base_model)
    try:
        with suffix_only(base_model, start, lambda: cached_inputs[state["batch"]]):
            for b, batch in enumerate(batches):
                state["batch"] = b
                if on_batch is not None:
                    on_batch(batch)
                try:
                    call_body(base_model, batch, device, cached_inputs[b] if start > 0 else None)
                except _StopForward:
                    pass
    finally:
        handle.remove()


class LayerPointCollector:
    """Keeps, for every decoder layer, its output at the points: an ``L x P x H`` float32 matrix.

    Args:
        base_model: the transformer body (``model.model``), called on ``input_ids``; its ``layers`` are hooked
            (read at every pass, so the collector follows merges that rebuild the ``ModuleList``).
        spec: which points.
        positions: ``(P, 2)`` global (sequence, position) pairs for ``tokens`` mode (from ``sample_token_positions``).
        cache_inputs: keep each layer's input hidden states for suffix-only recomputation.
    """

    def __init__(self, base_model: nn.Module, spec: PointSpec, positions: torch.Tensor | None, cache_inputs: bool) -> None:
        if spec.mode == "tokens" and positions is None:
            raise ValueError("tokens mode needs positions")
        self.base_model = base_model
        self.spec = spec
        self.positions = positions
        self.cache_inputs = cache_inputs
        self.inputs: list[list[torch.Tensor]] = []  # [layer][batch] -> (B, T, H)
        self.points: list[torch.Tensor] = []  # [layer] -> (P_local, H)
        self.point_ids: torch.Tensor | None = None  # global id of each local point

    # ---- point selection per batch ------------------------------------------------------------

    def _select(self, hidden: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Points of one batch and their global ids."""
        if self.spec.mode == "tokens":
            assert self.positions is not None
            seq = self.positions[:, 0]
            hit = torch.isin(seq, index.cpu())
            ids = torch.nonzero(hit).squeeze(1)
            local_row = {int(g): r for r, g in enumerate(index.tolist())}
            rows = torch.tensor([local_row[int(s)] for s in seq[ids]], dtype=torch.long)
            cols = self.positions[ids, 1]
            return hidden[rows, cols], ids
        m = mask.to(hidden.dtype).unsqueeze(-1)
        if self.spec.mode == "mean":
            pts = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        else:  # last non-padding token
            last = mask.long().sum(1) - 1
            pts = hidden[torch.arange(hidden.shape[0]), last.clamp(min=0)]
        return pts, index.cpu().long()

    @property
    def layers(self) -> nn.ModuleList:
        return self.base_model.layers

    # ---- passes ---------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, batches: Iterable[dict[str, torch.Tensor]], start: int = 0, stop: int | None = None) -> None:
        """One forward pass over the calibration batches, recomputing layers ``start..stop-1`` (default: to the end).

        ``start > 0`` needs the inputs cached by an earlier pass; the layers before ``start`` are not run, and with
        ``stop`` neither are the layers from ``stop`` on (their points and inputs are kept as they were).
        """
        num_layers = len(self.layers)
        stop = num_layers if stop is None else stop
        if not start < stop <= num_layers:
            raise ValueError(f"bad layer range {start}..{stop} of {num_layers}")
        if start > 0 and not (self.cache_inputs and len(self.inputs) == num_layers):
            raise RuntimeError("suffix recomputation needs the cached inputs of a previous full pass")
        if start == 0:
            self.points = [torch.empty(0)] * num_layers
            self.inputs = [[] for _ in range(num_layers)] if self.cache_inputs else []
        executor = executor_of(self.base_model)
        executor.sync()
        if executor.layerwise:
            self._run_layer_major(batches, start, stop, executor)
            return
        new_points: dict[int, list[torch.Tensor]] = {i: [] for i in range(start, stop)}
        new_inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(start, stop)}
        ids_all: list[torch.Tensor] = []
        state: dict = {}

        def make_hook(i: int):
            def hook(_module, _args, output):
                hidden = hidden_of(output)
                if not torch.isfinite(hidden).all():
                    raise MKAError(f"decoder layer {i} produced NaN/Inf activations; use float32 (model.dtype) or check the weights")
                pts, ids = self._select(hidden, state["index"], state["mask"])
                new_points[i].append(pts.float().cpu())
                if i == start:
                    ids_all.append(ids)

            return hook

        def make_pre_hook(i: int):
            def pre_hook(_module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                new_inputs[i].append(executor.cache(hidden))  # a copy; on CPU under layer-wise execution

            return pre_hook

        def stop_hook(_module, _args, _output):
            raise _StopForward

        handles = []
        for i in range(start, stop):
            handles.append(self.layers[i].register_forward_hook(make_hook(i)))
            if self.cache_inputs:
                handles.append(self.layers[i].register_forward_pre_hook(make_pre_hook(i), with_kwargs=True))
        if stop < num_layers:
            handles.append(self.layers[stop - 1].register_forward_hook(stop_hook))  # after the point hook
        with suffix_only(self.base_model, start, lambda: self.inputs[start][state["batch"]]), _hooks(handles):
            device = compute_device(self.base_model)
            for b, batch in enumerate(batches):
                state.update(index=batch["index"], mask=batch["attention_mask"], batch=b)
                try:
                    call_body(self.base_model, batch, device, self.inputs[start][b] if start > 0 else None)
                except _StopForward:
                    pass
        for i in range(start, stop):
            self.points[i] = torch.cat(new_points[i]) if new_points[i] else torch.empty(0)
            if self.cache_inputs:
                self.inputs[i] = new_inputs[i]
        if start == 0:
            self.point_ids = torch.cat(ids_all) if ids_all else torch.empty(0, dtype=torch.long)

    def _run_layer_major(self, batches: Iterable[dict[str, torch.Tensor]], start: int, stop: int, executor) -> None:
        """``run`` under layer-wise execution: each layer runs over every batch before the next one starts, so it is
        onloaded once per pass (llm-compressor's sequential onloading). Layer ``i``'s outputs, kept on CPU, are layer
        ``i + 1``'s inputs; the model's own forward runs each layer (``suffix_only`` + ``inputs_embeds``), so masks and
        position embeddings are the ones a full pass computes, and the result is the batch-by-batch pass's, bit for bit."""
        batches = list(batches)  # ids and masks only: every layer walks them
        device = executor.device
        current: list[torch.Tensor | None] = [self.inputs[start][b] if start > 0 else None for b in range(len(batches))]
        ids_all: list[torch.Tensor] = []
        state: dict = {}

        def capture(_module, args, kwargs):
            state["input"] = args[0] if args else kwargs["hidden_states"]

        def finish(_module, _args, output):
            state["output"] = hidden_of(output)
            raise _StopForward

        for i in range(start, stop):
            points: list[torch.Tensor] = []
            inputs: list[torch.Tensor] = []
            layer = self.layers[i]
            handles = [layer.register_forward_pre_hook(capture, with_kwargs=True), layer.register_forward_hook(finish)]
            with executor.held(layer), suffix_only(self.base_model, i, lambda: current[state["batch"]]), _hooks(handles):
                for b, batch in enumerate(batches):
                    state["batch"] = b
                    try:
                        call_body(self.base_model, batch, device, current[b])
                    except _StopForward:
                        pass
                    hidden = state.pop("output")
                    if not torch.isfinite(hidden).all():
                        raise MKAError(f"decoder layer {i} produced NaN/Inf activations; use float32 (model.dtype) or check the weights")
                    pts, ids = self._select(hidden, batch["index"], batch["attention_mask"])
                    points.append(pts.float().cpu())
                    if i == start:
                        ids_all.append(ids)
                    inputs.append(current[b] if current[b] is not None else executor.cache(state["input"]))
                    current[b] = executor.cache(hidden)
                    state.pop("input")
            self.points[i] = torch.cat(points) if points else torch.empty(0)
            if self.cache_inputs:
                self.inputs[i] = inputs
        if start == 0:
            self.point_ids = torch.cat(ids_all) if ids_all else torch.empty(0, dtype=torch.long)

    def release(self) -> None:
        """Free every layer's points and cached inputs; the next pass must start at layer 0."""
        self.points = []
        self.inputs = []

    def forget_layer(self, index: int) -> None:
        """Drop the state of a deleted layer so indices follow the new ``ModuleList``."""
        del self.points[index]
        if self.cache_inputs:
            del self.inputs[index]

    def matrix(self) -> torch.Tensor:
        """The local ``L x P_local x H`` points, float32."""
        return torch.stack(self.points)
