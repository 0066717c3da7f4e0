"""The MKA loop: points -> manifold features -> similarity -> pick a pair -> merge -> rescore the suffix.

No Lightning here: ``MergeCallback`` drives a ``LayerMerger`` and passes it a ``gather`` function for DDP.
"""

from __future__ import annotations

import time
from functools import partial
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lightning_mka.activations import LayerPointCollector, PointSpec, _StopForward, call_body, hidden_of, run_through_layer, sample_token_positions, suffix_only
from lightning_mka.execution import compute_device, executor_of
from lightning_mka.evaluation import shifted_token_nll
from lightning_mka.errors import MKAError
from lightning_mka.planning import candidate_pairs, choose_pair, merge_alpha, parse_alpha
from lightning_mka.similarity import SimilarityConfig, layer_feature, similarity_matrix
from lightning_mka.parallel import (
    GramAccumulator,
    check_parallel_supported,
    contribution_importance,
    kept_mlp_statistics,
    layer_width,
    masked_rows,
    mlp_input_norm,
    post_mlp_norm,
    prune_attention,
    prune_mlp,
    refit_residual,
    set_norm_scale,
    solve_refit,
    top_units,
)
from lightning_mka.surgery import apply_merge, check_merge_operator, decoder_stack, drop_layers, install_merged_layer, merged_temporarily

# gather(points (L, p_local, H), ids (p_local,)) -> (L, P, H) ordered by global point id, identical on every rank.
Gather = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def local_gather(points: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return points[:, ids.argsort()]


SELECTIONS = ("similarity", "verify", "damage")
RESCORE_SCOPES = ("suffix", "merged")
DEFAULT_ALPHA_GRID = (1.0, 0.75, 0.5, 0.25, 0.0)


@dataclass(frozen=True)
class MergeConfig:
    """Merge options; the defaults are the spec's (paper) reading.

    Extensions beyond the paper (off by default):
      - ``alpha="search"``: try every ``a`` in ``alpha_grid`` (1 and 0 drop one of the two layers) and keep the one with
        the lowest NLL on the first ``verify_batches`` calibration batches;
      - ``selection="verify"``: merge each of the ``verify_top`` most similar candidate pairs tentatively and keep the
        one whose merge gives the lowest calibration NLL. Both recompute only the suffix from the pair on.
      - with a parallel ``merge_operator``, ``alpha="search"`` compares the parallel merge with dropping either layer
        of the pair (a = 1 or 0) by the same calibration NLL.
      - ``selection="damage"`` (``parallel_pruned`` with ``refit_target: original``): prune each of the ``verify_top``
        most similar candidate pairs tentatively and keep the one with the smallest merge damage: the least-squares
        residual of the pruned layer against the two original layers in sequence, relative to what the pair adds to
        its input, ``sum ||y_pruned - y_original||^2 / sum ||y_original - h||^2`` on calibration tokens. It comes out
        of the refit's Gram statistics, no extra pass; the winner's pruned layer is installed as it is.

    ``rescore_scope``: after a merge at position ``l``, recompute the points of layers ``l..L-1`` (``suffix``, exact:
    the spec) or of layer ``l`` only (``merged``: the layers after it keep their points from the previous pass, an
    approximation that makes rescoring cost one layer instead of the suffix).

    ``merge_operator``: ``average`` (the paper: ``a*theta_l + (1-a)*theta_m``), ``parallel`` (one widened layer running
    both layers side by side; exact, removes depth, keeps parameters) or ``parallel_pruned`` (``parallel``, then pruned
    back to the original width on calibration activations, ``o_proj`` / ``down_proj`` refit by ridge least squares when
    ``prune_refit``). See ``lightning_mka.parallel``. ``refit_target``: ``original`` (default) refits ``down_proj`` so
    the pruned layer reproduces the two original layers run in sequence; ``widened`` matches the unpruned parallel
    layer (``o_proj`` always matches the widened attention).
    """

    alpha: str | float = "similarity"
    points: PointSpec = field(default_factory=PointSpec)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    max_distance: int = 1
    keep_first: int = 1
    keep_last: int = 1
    rescore_every: int = 1
    cache_inputs: bool = True
    selection: str = "similarity"
    verify_top: int = 3
    verify_batches: int = 1
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    rescore_scope: str = "suffix"
    merge_operator: str = "average"
    prune_refit: bool = True
    refit_ridge: float = 1e-3
    refit_target: str = "original"

    @property
    def averages(self) -> bool:
        return self.merge_operator == "average"

    @property
    def uses_nll(self) -> bool:
        return self.alpha == "search" or self.selection == "verify"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", parse_alpha(self.alpha))
        object.__setattr__(self, "alpha_grid", tuple(float(parse_alpha(a)) for a in self.alpha_grid))
        if self.selection not in SELECTIONS:
            raise MKAError(f"unknown selection {self.selection!r}; use one of {', '.join(SELECTIONS)}")
        for name in ("max_distance", "rescore_every", "verify_top", "verify_batches"):
            if getattr(self, name) < 1:
                raise MKAError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_merge_operator(self.merge_operator)
        if self.rescore_scope not in RESCORE_SCOPES:
            raise MKAError(f"unknown rescore_scope {self.rescore_scope!r}; use one of {', '.join(RESCORE_SCOPES)}")
        if self.rescore_scope == "merged" and not self.cache_inputs:
            raise MKAError("rescore_scope: merged recomputes the merged layer from its cached input; set cache_inputs: true")
        if self.refit_target not in ("widened", "original"):
            raise MKAError(f"unknown refit_target {self.refit_target!r}; use widened or original")
        if self.refit_ridge < 0:
            raise MKAError(f"refit_ridge must be >= 0, got {self.refit_ridge}")
        if not self.alpha_grid:
            raise MKAError("alpha_grid must hold at least one value in [0, 1]")
        if self.selection == "damage" and not (self.merge_operator == "parallel_pruned" and self.prune_refit and self.refit_target == "original"):
            raise MKAError("selection: damage measures the refit of parallel_pruned against the original layers; use merge_operator: parallel_pruned with refit_target: original and prune_refit: true")
        if self.selection == "damage" and self.alpha == "search":
            raise MKAError("selection: damage and alpha: search both choose the merge; use one of them")
        if self.uses_nll and (self.rescore_every != 1 or not self.cache_inputs):
            raise MKAError("alpha: search and selection: verify score merges on fresh cached inputs; use rescore_every: 1 and cache_inputs: true")
        for name in ("keep_first", "keep_last"):
            if getattr(self, name) < 0:
                raise MKAError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class MergeStep:
    """One merge, as recorded in ``merge_plan.json``."""

    step: int
    pair: tuple[int, int]  # current indices at the time of the merge (replayable)
    pair_original: tuple[int, int]  # first original layer of each side
    merged_original: list[int]  # all original layers now inside the kept layer
    score: float | None  # None for a pair merged without scoring (``LayerMerger.merge``)
    alpha: float | None  # None for the parallel operators
    depth_after: int
    rescored: bool
    op: str = "merge"
    calibration_nll: float | None = None  # mean token NLL on the verification slice (search / verify only)
    operator: str = "average"
    kept_kv_groups: list[int] | None = None  # parallel_pruned: KV groups of the widened layer that were kept
    kept_neurons: list[int] | None = None  # parallel_pruned: MLP neurons of the widened layer that were kept
    damage: float | None = None  # parallel_pruned: relative residual of the pruned layer against the two originals

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class MergeStats:
    full_passes: int = 0
    suffix_passes: int = 0
    layer_evaluations: int = 0  # decoder-layer forwards over the calibration set, all passes together
    collect_seconds: float = 0.0
    first_pass_seconds: float = 0.0
    score_seconds: float = 0.0
    merge_seconds: float = 0.0
    select_seconds: float = 0.0  # tentative merges that choose among candidates (verify, search, damage)


class LayerMerger:
    """Merges the most similar pair of decoder layers of ``model``, one step at a time.

    Args:
        model: the causal LM (changed in place).
        config: merge options.
        batches: returns a fresh iterable over this rank's calibration batches (same order every call, global
            sequence indices increasing, as the calibration loaders give them).
        lengths: non-padding length of every calibration sequence, all ranks together (for ``tokens`` points).
        gather: assembles the global point matrix from every rank's points (identity on one process).
        progress: ``progress(batches, description)`` wraps the batches of each calibration pass (e.g. to show it).
        batch_size: calibration sequences per batch as configured (``verify_batches`` counts batches of this size, at
            every world size); default: the rows of this rank's first batch.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MergeConfig,
        batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
        lengths: torch.Tensor,
        gather: Gather = local_gather,
        reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
        progress: Callable[[Iterable, str], Iterable] = lambda batches, _desc: batches,
        batch_size: int | None = None,
    ) -> None:
        base, layers = decoder_stack(model)
        self.model = model
        self.batch_size = batch_size
        self.num_sequences = int(len(lengths))
        self.config = config
        self.batches = batches
        self.gather = gather
        self.reduce = reduce
        self.progress = progress  # wraps the batches of each calibration pass to show its progress
        spec = config.points
        num_points = spec.num_points if spec.mode == "tokens" else int(len(lengths))
        config.similarity.check_points(num_points)
        if not config.averages:
            check_parallel_supported(model.config, config.merge_operator)
        positions = sample_token_positions(lengths, spec.num_points, spec.seed) if spec.mode == "tokens" else None
        self.collector = LayerPointCollector(base, spec, positions, cache_inputs=config.cache_inputs)
        self.origins: list[list[int]] = [[i] for i in range(len(layers))]
        self.plan: list[MergeStep] = []
        self.similarity: torch.Tensor | None = None
        self.similarity_history: list[torch.Tensor] = []
        self.stats = MergeStats()
        self._features: list = []
        self._stale_from: int | None = 0
        self._merges_since_rescore = 0

    @property
    def depth(self) -> int:
        return len(self.origins)

    def rescore(self) -> torch.Tensor:
        """Recompute points and features of the layers that changed, then the similarity matrix."""
        start = self._stale_from if self._stale_from is not None else self.depth
        if start < self.depth or self.similarity is None:
            if not self.config.cache_inputs:
                start = 0
            if self.similarity is None:
                start = 0
            tick = time.perf_counter()
            stop = start + 1 if start > 0 and self.config.rescore_scope == "merged" else self.depth
            what = f"calibration pass ({self.depth} layers)" if start == 0 else f"rescoring layers {start}-{stop - 1}"
            self.collector.run(self.progress(self.batches(), what), start=start, stop=stop)
            seconds = time.perf_counter() - tick
            self.stats.collect_seconds += seconds
            if start == 0:
                self.stats.full_passes += 1
                if self.stats.full_passes == 1:
                    self.stats.first_pass_seconds = seconds
            else:
                self.stats.suffix_passes += 1
            self.stats.layer_evaluations += stop - start
            tick = time.perf_counter()
            assert self.collector.point_ids is not None
            points = self.gather(self.collector.matrix(), self.collector.point_ids)
            features = self._features[:start] + [layer_feature(points[i], self.config.similarity) for i in range(start, stop)] + self._features[stop:]
            self._features = features
            self.similarity = similarity_matrix(features, self.config.similarity)
            self.stats.score_seconds += time.perf_counter() - tick
        self._stale_from = None
        self._merges_since_rescore = 0
        assert self.similarity is not None
        return self.similarity

    def step(self) -> MergeStep:
        """Pick the most similar candidate pair, merge it into its earlier layer, and record the step."""
        rescored = self.similarity is None or self._merges_since_rescore >= self.config.rescore_every
        similarity = self.rescore() if rescored else self.similarity
        assert similarity is not None
        if rescored:
            self.similarity_history.append(similarity.clone())
        cfg = self.config
        candidates = candidate_pairs(self.depth, cfg.max_distance, cfg.keep_first, cfg.keep_last)
        l, m, score = choose_pair(similarity, candidates)
        nll = None
        operator = cfg.merge_operator
        prepared = None
        tick = time.perf_counter()
        if cfg.uses_nll:
            l, m, operator, alpha, nll = self._verified_choice(similarity, candidates)
            score = float(similarity[l, m])
        elif cfg.selection == "damage":
            l, m, prepared = self._least_damage_choice(similarity, candidates)
            score, alpha = float(similarity[l, m]), None
        else:
            alpha = merge_alpha(cfg.alpha, similarity, l, m) if cfg.averages else None
        self.stats.select_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        if prepared is not None:
            layer, kept = prepared
            install_merged_layer(self.model, l, m, layer)
            executor_of(self.model).spill(decoder_stack(self.model)[1][l])
        else:
            # Layer l's cached input is current unless a merge before l came since the last scoring (rescore_every > 1).
            kept = self._apply(l, m, alpha, operator, self._input_current(l))
        self.stats.merge_seconds += time.perf_counter() - tick
        return self._record(l, m, kept, score=score, alpha=alpha, rescored=rescored, nll=nll, operator=operator)

    def merge(self, l: int, m: int, alpha: float | None = None) -> MergeStep:
        """Merge a pair chosen elsewhere (current indices ``l < m``) with the configured operator, without scoring:
        recorded in ``plan`` like a chosen step, with no score. E.g. another method's layer choice folded by our
        operator. ``alpha``: the weight of ``l`` for an averaging operator."""
        if isinstance(l, bool) or isinstance(m, bool) or not (isinstance(l, int) and isinstance(m, int) and 0 <= l < m < self.depth):
            raise MKAError(f"merge pair ({l}, {m}) is not two layers l < m of the current {self.depth}; give current indices")
        # Layer l's cached input is current only if scoring saw it and no merge or training came before l since.
        cached_input_ok = self.similarity is not None and self._input_current(l)
        tick = time.perf_counter()
        kept = self._apply(l, m, alpha, self.config.merge_operator, cached_input_ok)
        self.stats.merge_seconds += time.perf_counter() - tick
        return self._record(l, m, kept, score=None, alpha=alpha, rescored=False, nll=None, operator=self.config.merge_operator)

    def _record(self, l: int, m: int, kept: dict, score: float | None, alpha: float | None, rescored: bool, nll: float | None, operator: str) -> MergeStep:
        """Book a merge that has happened: the plan, the origins, and the cached points and scores of layer ``m``."""
        record = MergeStep(
            step=len(self.plan) + 1,
            pair=(l, m),
            pair_original=(self.origins[l][0], self.origins[m][0]),
            merged_original=sorted(self.origins[l] + self.origins[m]),
            score=score,
            alpha=alpha,
            depth_after=self.depth - 1,
            rescored=rescored,
            calibration_nll=nll,
            operator=operator,
            **kept,
        )
        self.origins[l] = record.merged_original
        del self.origins[m]
        if self.similarity is not None:  # keep what was scored, minus ``m``; layers from ``l`` on are stale
            self.collector.forget_layer(m)
            del self._features[m]
            keep = [i for i in range(self.similarity.shape[0]) if i != m]
            self.similarity = self.similarity[keep][:, keep]
            self._stale_from = l if self._stale_from is None else min(self._stale_from, l)
            self._merges_since_rescore += 1
        else:  # nothing scored yet (or invalidated): the next scoring runs a full pass
            if len(self.collector.points) > m:  # points of an earlier pass: keep their indices those of the layers
                self.collector.forget_layer(m)
            self._stale_from = 0
        self.plan.append(record)
        return record

    def invalidate(self) -> None:
        """Forget cached points, inputs and scores: the weights changed (e.g. fine-tuning between merges). Their memory
        is freed (the cached inputs are a layer's activations over all calibration tokens, per layer)."""
        self.collector.release()
        self.similarity = None
        self._features = []
        self._stale_from = 0
        self._merges_since_rescore = 0

    def _options(self, similarity: torch.Tensor, l: int, m: int) -> list[tuple[str, float | None]]:
        """(operator, alpha) options tried for one pair. ``alpha: search`` with a parallel operator also tries
        dropping either layer (``average`` with a = 1 or 0), so a step is never worse on calibration than a drop."""
        cfg = self.config
        if cfg.averages:
            alphas = cfg.alpha_grid if cfg.alpha == "search" else (merge_alpha(cfg.alpha, similarity, l, m),)
            return [("average", a) for a in alphas]
        options: list[tuple[str, float | None]] = [(cfg.merge_operator, None)]
        if cfg.alpha == "search":
            options += [("average", 1.0), ("average", 0.0)]
        return options

    def _verified_choice(self, similarity: torch.Tensor, candidates: list[tuple[int, int]]) -> tuple[int, int, str, float | None, float]:
        """Among the candidates to verify, the (pair, operator, alpha) whose tentative merge gives the lowest
        calibration NLL."""
        cfg = self.config
        ranked = self._ranked(similarity, candidates)
        pool = ranked[: cfg.verify_top] if cfg.selection == "verify" else ranked[:1]
        best: tuple[float, int, int, str, float | None] | None = None
        for l, m in pool:
            for operator, alpha in self._options(similarity, l, m):
                layers = decoder_stack(self.model)[1]
                originals = (layers[l], layers[m])
                cached_input_ok = self._input_current(l)
                with executor_of(self.model).materialized(*originals):
                    targets = self._pair_targets(l, m, cached_input_ok) if operator == "parallel_pruned" else None
                    with merged_temporarily(self.model, l, m, alpha, operator):
                        if operator == "parallel_pruned":
                            self._prune(l, m, originals, cached_input_ok, targets)
                        nll = self._slice_nll(start=l if cached_input_ok else 0)  # a stale cached input: the whole model
                if best is None or nll < best[0]:  # strict: ties keep the earlier (more similar, larger a) option
                    best = (nll, l, m, operator, alpha)
        assert best is not None
        nll, l, m, operator, alpha = best
        return l, m, operator, alpha, nll

    def _ranked(self, similarity: torch.Tensor, candidates: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return sorted(candidates, key=lambda p: (-float(similarity[p[0], p[1]]), p[0], p[1]))

    def _least_damage_choice(self, similarity: torch.Tensor, candidates: list[tuple[int, int]]) -> tuple[int, int, tuple[nn.Module, dict]]:
        """Among the ``verify_top`` most similar candidates, the pair whose pruned merge has the least damage; its
        pruned layer (built on the unchanged model) is reused. Ties keep the more similar pair."""
        best: tuple[float, int, int, nn.Module, dict] | None = None
        for l, m in self._ranked(similarity, candidates)[: self.config.verify_top]:
            layers = decoder_stack(self.model)[1]
            originals = (layers[l], layers[m])
            cached_input_ok = self._input_current(l)
            with executor_of(self.model).materialized(*originals):
                targets = self._pair_targets(l, m, cached_input_ok)
                with merged_temporarily(self.model, l, m, None, "parallel_pruned"):
                    kept = self._prune(l, m, originals, cached_input_ok, targets)
                    layer = decoder_stack(self.model)[1][l]
            if best is None or kept["damage"] < best[0]:
                best = (kept["damage"], l, m, layer, kept)
        assert best is not None
        _, l, m, layer, kept = best
        return l, m, (layer, kept)

    def _apply(self, l: int, m: int, alpha: float | None, operator: str, cached_input_ok: bool = True) -> dict:
        """Merge ``m`` into ``l`` with ``operator``; for ``parallel_pruned`` also prune (data-driven), from layer
        ``l``'s cached input when there is one and ``cached_input_ok``, else from a pass through the layers before."""
        layers = decoder_stack(self.model)[1]
        originals = (layers[min(l, m)], layers[max(l, m)])
        executor = executor_of(self.model)
        with executor.materialized(*originals):  # surgery reads (and, averaging, writes) real weights
            targets = self._pair_targets(l, m, cached_input_ok) if operator == "parallel_pruned" else None
            apply_merge(self.model, l, m, operator, alpha)
            kept = self._prune(l, m, originals, cached_input_ok, targets) if operator == "parallel_pruned" else {}
            executor.spill(decoder_stack(self.model)[1][min(l, m)])  # disk offload: the merged layer goes to disk
        return kept

    @torch.no_grad()
    def _prune(self, l: int, m: int, originals: tuple[nn.Module, nn.Module], cached_input_ok: bool = True,
               pair_targets: list[torch.Tensor] | None = None) -> dict:
        """Prune the widened layer ``l`` back to the config's width from its inputs on the calibration set.

        ``originals``: the two layers it replaced, run in sequence as the refit target when ``refit_target`` is
        ``original``; ``pair_targets``: that target per batch, computed before the merge (``_pair_targets``).
        Returns the kept units and the merge ``damage`` (``None`` unless refit towards the originals).
        """
        base, layers = decoder_stack(self.model)
        layer = layers[l]
        config = self.model.config
        cfg = self.config
        # Layer l's input is unchanged by merging l with the layer after it, so its cached input stays valid.
        inputs = self.collector.inputs
        cached = inputs[l] if cached_input_ok and cfg.cache_inputs and len(inputs) > l and inputs[l] else None
        state: dict = {}
        post_norm = post_mlp_norm(layer)
        target_cache = self._cached_pair_output(l) if cached is not None and m == l + 1 else None
        target_cache = pair_targets if target_cache is None else target_cache

        def run_layer(hooks: list) -> None:
            handles = [register(hook) for register, hook in hooks]
            state.pop("batch", None)
            try:
                run_through_layer(base, l, self.batches(), cached, on_batch=lambda batch: state.update(mask=batch["attention_mask"], batch=state.get("batch", -1) + 1))
            finally:
                for h in handles:
                    h.remove()

        if layer_width(layer).kv_heads > config.num_key_value_heads:
            acc = GramAccumulator()

            def attention_inputs(_m, args):
                acc.add(args[0], state["mask"])
                raise _StopForward  # the attention statistics need nothing after o_proj

            run_layer([(layer.self_attn.o_proj.register_forward_pre_hook, attention_inputs)])
            # Summed over ranks: every rank prunes the same way.
            groups = prune_attention(layer, config.num_key_value_heads, self.reduce(acc.gram), cfg.prune_refit, cfg.refit_ridge)
        else:  # first-attention merge (Qwen3, Gemma3): the attention is already one layer's
            groups = list(range(layer_width(layer).kv_heads))

        # The MLP sees the pruned attention's output: measure it after the attention is final. One pass stores
        # down_proj's inputs (tokens x 2 intermediate, in the model's dtype) and the refit targets and sums the Gram
        # diagonal the neuron scores need; the kept neurons' statistics then come from the stored inputs, never the
        # (2 x intermediate)^2 Gram matrix.
        original_target = cfg.prune_refit and cfg.refit_target == "original"
        down_inputs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        sums: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor) -> None:
            sums[name] = value if name not in sums else sums[name] + value

        def store_down_inputs(_m, args):
            x = masked_rows(args[0], state["mask"])
            down_inputs.append(x)
            add("diagonal", x.float().pow(2).sum(0))
            if original_target:
                flat = lambda t: masked_rows(t, state["mask"]).double()  # noqa: E731
                target = flat(state["target"] - state["h1"])  # what the MLP must add for the originals' output
                targets.append(target.float())
                add("target_sq", target.pow(2).sum())
                add("update_sq", flat(state["target"] - state["h"]).pow(2).sum())
                if post_norm is not None:  # the norm's output should follow the target's direction
                    unit = target / target.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-12)
                    add("unit_cross", (unit * target).sum(0))
                    add("unit_sq", unit.pow(2).sum(0))
            raise _StopForward

        def run_originals(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            state["h"] = h
            if target_cache is not None:
                state["target"] = target_cache[state["batch"]].to(h.device)
                return
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            out = hidden_of(originals[0](h, *args[1:], **rest))
            state["target"] = hidden_of(originals[1](out, *args[1:], **rest))

        hooks = [(layer.mlp.down_proj.register_forward_pre_hook, store_down_inputs)]
        if original_target:
            hooks += [(partial(layer.register_forward_pre_hook, with_kwargs=True), run_originals),
                      (mlp_input_norm(layer).register_forward_pre_hook, lambda _m, args: state.update(h1=args[0]))]
        run_layer(hooks)
        sums = {k: self.reduce(v) for k, v in sums.items()}
        mlp = layer.mlp
        refit_targets = targets if original_target else None
        if post_norm is not None and original_target:
            # Neurons scored in the least-squares map from ALL neurons to the target (the widened halves are not on
            # one scale before a post-MLP norm): this needs every neuron's statistics, the full Gram matrix.
            keep = torch.arange(layer_width(layer).neurons)
            gram, cross = kept_mlp_statistics(mlp.down_proj.weight, down_inputs, refit_targets, keep, self.reduce)
            neurons = prune_mlp(layer, config.intermediate_size, gram, cfg.prune_refit, cfg.refit_ridge, cross=cross, fitted_importance=True)
            index = torch.tensor(neurons, dtype=torch.long, device=gram.device)
            gram, cross = gram[index][:, index], cross[index]
        else:
            neurons = top_units(contribution_importance(mlp.down_proj.weight, sums["diagonal"], layer_width(layer).neurons), config.intermediate_size)
            down_weight = None
            if cfg.prune_refit:
                gram, cross = kept_mlp_statistics(mlp.down_proj.weight, down_inputs, refit_targets, torch.tensor(neurons, dtype=torch.long), self.reduce)
                down_weight = solve_refit(gram, cross, cfg.refit_ridge)
            prune_mlp(layer, config.intermediate_size, None, cfg.prune_refit, cfg.refit_ridge, keep_neurons=neurons, down_weight=down_weight)
        damage = None
        if original_target:
            residual = refit_residual(layer.mlp.down_proj.weight, gram, cross, float(sums["target_sq"]))
            damage = residual / max(float(sums["update_sq"]), 1e-30)
            if post_norm is not None:
                set_norm_scale(post_norm, sums["unit_cross"] / sums["unit_sq"].clamp(min=1e-12))
        return {"kept_kv_groups": groups, "kept_neurons": neurons, "damage": damage}

    def _input_current(self, l: int) -> bool:
        """Whether layer ``l``'s cached input is still its input: no merge before ``l`` since the last scoring."""
        return self._stale_from is None or l <= self._stale_from

    def _mixed_layer_types(self, l: int, m: int) -> bool:
        types = getattr(self.model.config, "layer_types", None)
        return isinstance(types, (list, tuple)) and len(types) == self.depth and types[l] != types[m]

    @torch.no_grad()
    def _pair_targets(self, l: int, m: int, cached_input_ok: bool) -> list[torch.Tensor] | None:
        """The refit target of a pair whose layers have different layer types (Gemma3, Qwen2/3: sliding and full
        attention), when no cached output gives it: layer ``l`` then layer ``m``, each called with the attention mask
        and rotary embeddings of its own type, from one pass over the unmerged stack. (Run inside the merged layer's
        pass, as ``_prune`` does otherwise, both would get layer ``l``'s.) ``None`` when not needed."""
        cfg = self.config
        if not (cfg.prune_refit and cfg.refit_target == "original" and self._mixed_layer_types(l, m)):
            return None
        inputs = self.collector.inputs
        cached = cached_input_ok and cfg.cache_inputs and len(inputs) > l and inputs[l]
        if cached and m == l + 1 and self._cached_pair_output(l) is not None:
            return None  # the cached output of the pair is the target
        base, layers = decoder_stack(self.model)
        targets: list[torch.Tensor] = []
        first: dict = {}

        def at_first(_module, args, kwargs):
            first["call"] = (args, kwargs)

        def at_second(_module, args, kwargs):
            if m == l + 1:
                return None  # its input is layer l's output
            first_args, first_kwargs = first["call"]  # the layers between are skipped, as in the merged model
            h = hidden_of(layers[l](*first_args, **first_kwargs))
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        executor = executor_of(self.model)

        def after_second(_module, _args, output):
            targets.append(executor.cache(hidden_of(output)))  # on CPU under layer-wise execution, like cached inputs
            raise _StopForward

        handles = [layers[l].register_forward_pre_hook(at_first, with_kwargs=True),
                   layers[m].register_forward_pre_hook(at_second, with_kwargs=True),
                   layers[m].register_forward_hook(after_second)]
        try:
            run_through_layer(base, m, self.batches())
        finally:
            for handle in handles:
                handle.remove()
        return targets

    def _cached_pair_output(self, l: int) -> list[torch.Tensor] | None:
        """The cached input of the layer after the pair being merged at ``l`` (its layers ``l`` and ``l + 1`` are
        still separate in the cache): the refit target, when it is what running the original pair would give.

        Suffix rescoring that just ran: it IS the original pair's output on the current input (exact, two layer runs
        saved). ``rescore_scope: merged``: every cached input is the dense model's (nothing after the first pass is
        refreshed), so it is the dense model's output of the original layers the pair covers, on the dense input the
        refit also sees: the merged layer is fitted to the dense model itself. Otherwise None (run the pair).
        """
        inputs = self.collector.inputs
        after = l + 2
        if not self.config.cache_inputs or len(inputs) != self.depth or after >= len(inputs) or not inputs[after]:
            return None
        fresh = self._stale_from is None and self.config.rescore_scope == "suffix"
        return inputs[after] if fresh or self.config.rescore_scope == "merged" else None

    @torch.no_grad()
    def _slice_nll(self, start: int) -> float:
        """Mean next-token NLL of the model on the first ``verify_batches`` batches' worth of calibration sequences,
        running only the layers from ``start`` on (their input is cached and unchanged by a merge at ``start``).

        The sequences are chosen by global index (the first ``verify_batches x batch size``), wherever they are: under
        DDP each rank scores the ones it holds and the per-sequence sums are added over the ranks, so every world size
        scores the same sequences (each rank's own first batches would be other sequences, and another plan).
        """
        base, _ = decoder_stack(self.model)
        executor_of(self.model).sync()
        device = compute_device(self.model)
        per_sequence: torch.Tensor | None = None  # (limit, 2): NLL sum and token count of each chosen sequence
        state = {"batch": 0}
        with suffix_only(base, start, lambda: self.collector.inputs[start][state["batch"]][state["rows"]]):
            for b, batch in enumerate(self.batches()):
                if per_sequence is not None and int(batch["index"].min()) >= per_sequence.shape[0]:
                    break  # a rank's later batches hold only later sequences (shards interleave, in order)
                if per_sequence is None:
                    size = self.batch_size if self.batch_size is not None else batch["input_ids"].shape[0]
                    limit = min(self.config.verify_batches * size, self.num_sequences)
                    per_sequence = torch.zeros(limit, 2, dtype=torch.float64)
                rows = (batch["index"] < per_sequence.shape[0]).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                state.update(batch=b, rows=rows)
                chosen = {k: v[rows] for k, v in batch.items()}
                cached = self.collector.inputs[start][b][rows] if start > 0 else None
                # from layer start on: the cached input replaces the embeddings (the whole model: its head gives logits)
                logits = call_body(self.model, chosen, device, cached).logits
                ids, mask = chosen["input_ids"].to(device), chosen["attention_mask"].to(device)
                for i, index in enumerate(chosen["index"].tolist()):
                    nll_sum, count, _ = shifted_token_nll(logits[i : i + 1], ids[i : i + 1], mask[i : i + 1])
                    per_sequence[index] = torch.tensor([float(nll_sum), float(count)], dtype=torch.float64)
        assert per_sequence is not None, "no calibration batch"
        total = self.reduce(per_sequence).sum(0)  # each sequence is nonzero on one rank: the sum over ranks is exact
        return float(total[0] / total[1])

    def replay(self, records: Iterable[dict], apply: bool = True) -> None:
        """Take over recorded steps before any scoring; the next step rescores fully.

        ``apply=True`` re-applies them to the model (resuming an interrupted run on fresh weights); ``apply=False``
        only adopts the record, for a model that already carries them (restored from a checkpoint).
        """
        if self.similarity is not None or self.plan:
            raise RuntimeError("replay must happen before the first scoring step or merge")
        records = list(records)
        if apply:
            count, reason = exactly_replayable(self.config, records)
            if count < len(records):
                raise MKAError(f"cannot resume from all {len(records)} recorded merges: {reason}; replay the first {count}")
        if not apply:  # the model already lost one layer per recorded merge
            self.origins = [[i] for i in range(len(self.origins) + len(records))]
        for record in records:
            step = MergeStep(**{**record, "pair": tuple(record["pair"]), "pair_original": tuple(record["pair_original"])})
            if step.op != "merge":
                raise MKAError(f"cannot resume: step {step.step} is a {step.op!r}, not a merge")
            l, m = step.pair
            if apply:
                kept = self._apply(l, m, step.alpha, step.operator)
                kept.pop("damage", None)
                if kept and (kept["kept_kv_groups"] != step.kept_kv_groups or kept["kept_neurons"] != step.kept_neurons):
                    raise MKAError(f"cannot resume: replaying step {step.step} pruned differently than recorded; the calibration data or model changed")
            self.origins[l] = sorted(self.origins[l] + self.origins[m])
            del self.origins[m]
            self.plan.append(step)
        if len(self.origins) != len(decoder_stack(self.model)[1]):
            raise MKAError(f"the recorded plan leaves {len(self.origins)} layers but the model has {len(decoder_stack(self.model)[1])}; the checkpoint does not match this model")

    def merge_to(self, target_depth: int, max_steps: int | None = None) -> list[MergeStep]:
        steps = []
        while self.depth > target_depth and (max_steps is None or len(steps) < max_steps):
            steps.append(self.step())
        return steps


def exactly_replayable(config: MergeConfig, records: list[dict]) -> tuple[int, str | None]:
    """How many of ``records`` (a killed run's merges) a rerun can re-apply on fresh weights and then go on exactly as
    the killed run would have, and why not all of them (None when all).

    A rerun's next step scores from a full pass over the model as it then is. ``rescore_scope: merged`` scored and
    refitted against the dense model's cached states, which a rerun does not have: none. ``rescore_every > 1``: the
    merges after the last scoring read that scoring's matrix: the records before it (the rerun then scores where the
    killed run did)."""
    if not records:
        return 0, None
    if config.rescore_scope == "merged":
        return 0, "rescore_scope: merged scores and refits against the dense model's cached states of the killed run, which a rerun does not have"
    if config.rescore_every > 1:
        scored = [i for i, record in enumerate(records) if record.get("rescored")]
        last = scored[-1] if scored else 0
        if len(records) - last < config.rescore_every:
            return last, f"with rescore_every: {config.rescore_every} the merges after a scoring read its matrix, which a rerun does not have"
    return len(records), None


def replay_plan(model: nn.Module, plan: Iterable[dict]) -> None:
    """Re-apply recorded merges and drops (current indices) to a fresh model, e.g. before loading a checkpoint."""
    for record in plan:
        if record.get("op", "merge") == "drop":
            drop_layers(model, [int(i) for i in record["remove"]])
            continue
        l, m = (int(i) for i in record["pair"])
        operator = record.get("operator", "average")
        alpha = record.get("alpha")
        apply_merge(model, l, m, operator, None if alpha is None else float(alpha))
        if operator == "parallel_pruned":
            # Structure only (the pruned weights come from the checkpoint that follows): keep the recorded widths.
            layer = decoder_stack(model)[1][l]
            prune_attention(layer, model.config.num_key_value_heads, None, refit=False, keep_groups=list(record["kept_kv_groups"]))
            prune_mlp(layer, model.config.intermediate_size, None, refit=False, keep_neurons=list(record["kept_neurons"]))
