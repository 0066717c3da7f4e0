"""Which parameters heal a merged model: all, the layers next to merges, or LoRA adapters (``peft``)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lightning_mka.errors import MKAError

TRAINABLE = ("all", "layers", "merged", "lora", "tail")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_trainable(mode: str, lora_rank: int = 8, tail_layers: int = 3, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                    lora_targets: list[str] | None = None) -> None:
    if mode not in TRAINABLE:
        raise MKAError(f"unknown trainable {mode!r}; use one of {', '.join(TRAINABLE)}")
    if mode == "tail" and (not isinstance(tail_layers, int) or tail_layers < 0):
        raise MKAError(f"tail_layers must be an integer >= 0, got {tail_layers!r}")
    if mode == "lora":
        require_peft()
        if not isinstance(lora_rank, int) or lora_rank < 1:
            raise MKAError(f"lora_rank must be an integer >= 1, got {lora_rank!r}")
        if not lora_alpha > 0:
            raise MKAError(f"lora_alpha must be > 0, got {lora_alpha!r}; the adapters' scale is lora_alpha / lora_rank (default 16)")
        if not 0 <= lora_dropout < 1:
            raise MKAError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if lora_targets is not None and (not lora_targets or not all(isinstance(t, str) and t for t in lora_targets)):
            raise MKAError(f"lora_targets must be a non-empty list of linear layer names (e.g. [q_proj, v_proj]), got {lora_targets!r}")


def check_lora_targets(model: nn.Module, targets: list[str] | None) -> None:
    """Every LoRA target names linear layers of ``model`` (a module name or its dotted tail, as peft matches them)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    missing = [t for t in (targets or DEFAULT_LORA_TARGETS) if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise MKAError(f"lora_targets {missing} name no linear layer of this model; its linear layers are {kinds}")


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise MKAError("trainable: lora needs peft; pip install peft (or pip install 'lightning-mka[lora]'), or use trainable: all | merged") from None


def current_origins(depth_before: int, plan: Iterable[dict]) -> list[list[int]]:
    """Original layers inside every current layer after the recorded merges and drops."""
    origins = [[i] for i in range(depth_before)]
    for record in plan:
        if record.get("op", "merge") == "drop":
            gone = set(int(i) for i in record["remove"])
            origins = [o for i, o in enumerate(origins) if i not in gone]
            continue
        l, m = (int(i) for i in record["pair"])
        origins[l] = sorted(origins[l] + origins[m])
        del origins[m]
    return origins


def depth_before(depth: int, plan: Iterable[dict]) -> int:
    """The depth before the recorded merges (one layer each) and drops (``remove``) that left ``depth`` layers."""
    return depth + sum(1 if r.get("op", "merge") == "merge" else len(r["remove"]) for r in plan)


def merged_layers(depth: int, plan: list[dict]) -> set[int]:
    """Current indices of the layers that hold two or more original layers."""
    return {i for i, o in enumerate(current_origins(depth_before(depth, plan), plan)) if len(o) > 1}


def layers_next_to_merges(depth: int, plan: list[dict]) -> set[int]:
    """Current indices of merged layers and their immediate neighbours."""
    return {j for i in merged_layers(depth, plan) for j in (i - 1, i, i + 1) if 0 <= j < depth}


def layer_parameters(model: nn.Module, layers: nn.ModuleList) -> list[nn.Parameter]:
    """Every decoder layer and the final norm; not the input embeddings or the output head (``trainable: layers``:
    the vocabulary matrices, a large share of a small model's parameters and of the optimizer state, stay as the dense
    model learned them)."""
    modules = [m for m in (*layers, getattr(getattr(model, "model", model), "norm", None)) if m is not None]
    frozen = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None for p in m.parameters()}
    return [p for m in modules for p in m.parameters() if id(p) not in frozen]


def tail_parameters(model: nn.Module, layers: nn.ModuleList, count: int) -> list[nn.Parameter]:
    """The last ``count`` decoder layers, the final norm and the output head ("Reassessing Layer Pruning"). With tied
    embeddings the head's weight is the input embedding matrix, which then trains too."""
    modules = list(layers)[max(0, len(layers) - count) :] if count else []  # more than the depth: every layer
    base = getattr(model, "model", model)
    for extra in (getattr(base, "norm", None), model.get_output_embeddings()):
        if extra is not None:
            modules.append(extra)
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def has_lora(model: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())


def inject_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str] | None) -> None:
    """Fresh LoRA adapters on the decoder's linear layers; only they train (B starts at 0: no change in function)."""
    require_peft()
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets or DEFAULT_LORA_TARGETS))
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)


def fold_lora(model: nn.Module) -> int:
    """Merge every LoRA adapter into its base weight and put the plain ``nn.Linear`` back; returns how many."""
    if not has_lora(model):
        return 0
    from peft.tuners.lora import LoraLayer

    folded = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            base = module.get_base_layer()
            setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
            folded += 1
    if hasattr(model, "peft_config"):
        del model.peft_config  # injection bookkeeping; fresh adapters are injected after the next merge
    for p in model.parameters():
        p.requires_grad_(True)
    return folded
