"""Side-by-side depth compression of SmolLM2-135M: MKA vs the drop baselines, same calibration, same evaluation.

    .venv/bin/python bench/compare_methods.py                       # all methods, k = 3 6 9 12
    .venv/bin/python bench/compare_methods.py --methods mka --ks 6  # a subset; rows are merged into the results

Calibration: 16 x 512 tokens of the wiki calibration articles (the same for every method). Evaluation: held-out wiki
articles and the Lee corpus (perplexity, top-1 agreement with the dense model), MMLU letter and cloze accuracy on
a fixed evaluation subset that never meets the calibration split. Every row is stored in
``bench/results/compare_methods.json``; the table (dense row first) goes to ``compare_methods.md`` and a plot of
wiki perplexity vs layers removed to ``compare_methods.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_data_arguments, calibration_batches, evaluate, load_dense, peak_rss, setup_data  # noqa: E402

from lightning_mka.activations import PointSpec  # noqa: E402
from lightning_mka.baselines import DROP_METHODS, STATISTICS_METHODS, collect_drop_statistics, select_layers_to_drop  # noqa: E402
from lightning_mka.merging import LayerMerger, MergeConfig  # noqa: E402
from lightning_mka.replaceme import replace_block  # noqa: E402
from lightning_mka.similarity import SimilarityConfig  # noqa: E402
from lightning_mka.surgery import decoder_stack, drop_layers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# MKA variants: the spec's defaults, plus ablations (alpha, points, similarity measure, rescoring).
MKA_VARIANTS: dict[str, dict] = {
    "mka": {},
    "mka-alpha-official": {"alpha": "official"},
    "mka-alpha-0.5": {"alpha": 0.5},
    "mka-points-last": {"points": "last"},
    "mka-points-mean": {"points": "mean"},
    "mka-cosine": {"similarity": "cosine"},
    "mka-cka": {"similarity": "cka"},
    "mka-rescore-once": {"rescore_every": 1000},
    # our extensions (spec section 4): choose a, and the pair, by calibration NLL
    "mka-search": {"alpha": "search"},
    "mka-search-verify": {"alpha": "search", "selection": "verify"},
    # merge operators (lightning_mka.parallel): "mka" above is the paper's weight average (mka-average)
    "mka-parallel": {"merge_operator": "parallel"},  # depth only: keeps every parameter
    "mka-parallel-pruned": {"merge_operator": "parallel_pruned"},  # pruned back: same size as a drop
    "mka-parallel-pruned-widened": {"merge_operator": "parallel_pruned", "refit_target": "widened"},
    "mka-parallel-pruned-norefit": {"merge_operator": "parallel_pruned", "prune_refit": False},  # importance pruning only
    "mka-parallel-pruned-verify": {"merge_operator": "parallel_pruned", "selection": "verify"},
    # parallel_pruned, or dropping either layer of the NPIB pair, whichever gives the lower calibration NLL
    "mka-parallel-pruned-search": {"merge_operator": "parallel_pruned", "alpha": "search"},
    "mka-parallel-pruned-search-verify": {"merge_operator": "parallel_pruned", "alpha": "search", "selection": "verify"},
    "mka-merged-scope": {"rescore_scope": "merged"},  # the spec, rescoring only the merged layer (speed ablation)
    # which NPIB candidate to merge: the least merge damage (relative LS residual vs the two original layers)
    "mka-parallel-pruned-damage": {"merge_operator": "parallel_pruned", "selection": "damage", "verify_top": 3},
    "mka-parallel-pruned-damage5": {"merge_operator": "parallel_pruned", "selection": "damage", "verify_top": 5},
    "mka-parallel-pruned-damage-all": {"merge_operator": "parallel_pruned", "selection": "damage", "verify_top": 1000},  # no NPIB
    "mka-parallel-pruned-merged-scope": {"merge_operator": "parallel_pruned", "rescore_scope": "merged"},
    "mka-parallel-pruned-damage-merged-scope": {"merge_operator": "parallel_pruned", "selection": "damage", "verify_top": 3, "rescore_scope": "merged"},
}


def mka_config(variant: str, calibration_sequences: int) -> MergeConfig:
    options = dict(MKA_VARIANTS[variant])
    points = options.pop("points", "tokens")
    measure = options.pop("similarity", "npib")
    spec = PointSpec(points, 1024 if points == "tokens" else calibration_sequences, 0)
    similarity = SimilarityConfig(measure=measure)
    if points != "tokens":  # N points only: fewer bins so every joint cell can be populated
        similarity = replace(similarity, bins=2)
    return MergeConfig(points=spec, similarity=similarity, **options)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def prefill_ms_per_token(model, data, repeats: int = 3) -> float:
    """Prefill latency: the best of ``repeats`` forwards of one held-out 512-token sequence, per token."""
    ids = data.eval_ids[data.val_names[0]][:1]
    model(input_ids=ids, use_cache=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        tick = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        best = min(best, time.perf_counter() - tick)
    return 1000.0 * best / ids.shape[1]


def ppls(metrics: dict) -> str:
    return " ".join(f"{k[:-4]} {v:.2f}" for k, v in metrics.items() if k.endswith("_ppl"))


MEASURE_LATENCY = True  # --no-latency turns it off (large vocabularies: the LM head dominates and costs minutes)


def row(method, k, depth, model, metrics, seconds, peak_mb, plan, data=None):
    latency = {"prefill_ms_per_token": round(prefill_ms_per_token(model, data), 3)} if data is not None and MEASURE_LATENCY else {}
    return {"method": method, "k": k, "layers": depth, "params": params(model), "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb), "plan": plan, **latency, **metrics}


def run_mka(variant, dense, data, ks, reference, log):
    model = copy.deepcopy(dense)
    merger = LayerMerger(model, mka_config(variant, len(data.calibration_ids)), calibration_batches(data), torch.full((len(data.calibration_ids),), data.seq_len))
    depth, elapsed, rows = len(decoder_stack(model)[1]), 0.0, []
    for k in sorted(ks):
        with peak_rss() as peak:
            tick = time.perf_counter()
            merger.merge_to(depth - k)
            elapsed += time.perf_counter() - tick
        plan = [f"{s.pair_original[0]}+{s.pair_original[1]}" + (f"@{s.alpha:.2f}" if s.alpha is not None else f"/{s.operator}") for s in merger.plan]
        log(f"{variant} k={k}: {plan} ({elapsed:.0f} s)")
        rows.append(row(variant, k, depth - k, model, evaluate(model, data, reference, False), elapsed, peak["mb"], plan, data))
        log("  " + ppls(rows[-1]))
    return rows


def run_drop(method, dense, data, ks, reference, log):
    depth = len(decoder_stack(dense)[1])
    with peak_rss() as peak:
        tick = time.perf_counter()
        stats = collect_drop_statistics(decoder_stack(dense)[0], data.calibration_dataloader()) if method in STATISTICS_METHODS else None
        stats_seconds = time.perf_counter() - tick
    rows = []
    for k in sorted(ks):
        model = copy.deepcopy(dense)
        remove = select_layers_to_drop(method, depth, k, stats)
        seconds = stats_seconds
        with peak_rss() as peak_fit:
            tick = time.perf_counter()
            if method == "replaceme":  # + one pass to the block's end for the least-squares transform
                replace_block(model, remove[0], remove[-1] + 1, iter(data.calibration_dataloader()))
            else:
                drop_layers(model, remove)
            seconds += time.perf_counter() - tick
        log(f"{method} k={k}: drop {remove} ({seconds:.0f} s)")
        rows.append(row(method, k, depth - k, model, evaluate(model, data, reference, False), seconds, max(peak["mb"], peak_fit["mb"]), remove, data))
        log("  " + ppls(rows[-1]))
        del model
    return rows


COLUMNS = [
    ("method", "method", "{}"),
    ("k", "removed", "{}"),
    ("layers", "layers", "{}"),
    ("params", "params (M)", "{:.1f}"),
    ("wiki_ppl", "wiki ppl", "{:.2f}"),
    ("lee_ppl", "lee ppl", "{:.2f}"),
    ("heldaside_ppl", "held-aside ppl", "{:.2f}"),
    ("wiki_top1_agree", "top-1 agree (wiki)", "{:.3f}"),
    ("mmlu_cloze_acc", "MMLU cloze", "{:.3f}"),
    ("mmlu_letter_acc", "MMLU letter", "{:.3f}"),
    ("prefill_ms_per_token", "prefill ms/token", "{:.2f}"),
    ("seconds", "compress s", "{}"),
    ("peak_rss_mb", "peak RSS MB", "{}"),
]


def table(rows: list[dict]) -> str:
    def cell(r, key, fmt):
        value = r.get(key)
        if value is None:
            return "-"
        return fmt.format(value / 1e6 if key == "params" else value)

    order = {m: i for i, m in enumerate(["dense", *DROP_METHODS, *MKA_VARIANTS])}
    rows = sorted(rows, key=lambda r: (r["k"], order.get(r["method"], 99), r["method"]))
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    rule = "|" + "---|" * len(columns)
    return "\n".join([head, rule, *("| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows)])


def stem(model: str) -> str:
    """Result files of the default model keep their historical names; other models get their own."""
    return "compare_methods" if model == "smollm2-135m" else f"compare_methods_{model}"


def plot(rows: list[dict], path: Path, model: str = "smollm2-135m", depth: int = 30) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r["method"] == "dense")
    ppl = "wiki_ppl" if "wiki_ppl" in dense else next(k for k in dense if k.endswith("_ppl"))
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["method"] for r in rows} - {"dense"}):
        points = sorted((r["k"], r[ppl]) for r in rows if r["method"] == method)
        axis.plot([0] + [p[0] for p in points], [dense[ppl]] + [p[1] for p in points], marker="o", label=method)
    axis.set_yscale("log")
    axis.set_xlabel(f"decoder layers removed (of {depth})")
    axis.set_ylabel("held-out wiki perplexity (log)")
    axis.set_title(f"{model}: depth compression, same calibration and evaluation")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def render(store: dict, out: Path) -> None:
    model = store["setup"].get("model", "smollm2-135m")
    name = stem(model)
    dense = next((r for r in store["rows"] if r["method"] == "dense"), {"layers": 30})
    (out / f"{name}.md").write_text(
        f"# Depth compression of {model}\n\n"
        f"Setup: {json.dumps(store['setup'])}. Calibration: wiki calibration articles; evaluation: "
        + ("HELD-ASIDE calibration-source sequences (the tail of the wiki calibration articles; for choosing defaults). "
           if store["setup"].get("heldaside") else "held-out wiki articles, Lee corpus, MMLU evaluation split (never the calibration split). ")
        + "`compress s`: statistics + selection "
        "(+ merging) time on 2 CPU cores; `peak RSS MB`: process peak while compressing.\n\n" + table(store["rows"]) + "\n"
    )
    plot(store["rows"], out / f"{name}.png", model, dense["layers"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=[*DROP_METHODS, "mka"], help=f"from {[*DROP_METHODS, *MKA_VARIANTS]}")
    parser.add_argument("--ks", nargs="+", type=int, default=[3, 6, 9, 12])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="only rewrite the table and plot from the stored rows")
    parser.add_argument("--no-latency", action="store_true", help="skip the prefill latency column")
    args = parser.parse_args()
    global MEASURE_LATENCY
    MEASURE_LATENCY = not args.no_latency
    for m in args.methods:
        if m not in DROP_METHODS and m not in MKA_VARIANTS:
            parser.error(f"unknown method {m!r}; choose from {[*DROP_METHODS, *MKA_VARIANTS]}")
    args.out.mkdir(parents=True, exist_ok=True)
    store_path = args.out / f"{stem(args.model)}.json"
    store = json.loads(store_path.read_text()) if store_path.exists() else {"rows": []}
    setup = {k: getattr(args, k) for k in ("model", "calibration_samples", "seq_len", "eval_samples", "mmlu_per_topic")}
    if args.heldaside:
        setup["heldaside"] = args.heldaside
    if store.get("setup") not in (None, setup):
        store = {"rows": []}  # another setup: do not mix rows measured differently
    store["setup"] = setup

    if args.render:
        render(store, args.out)
        return

    def log(message: str) -> None:
        print(message, flush=True)

    dense = load_dense(args)
    data = setup_data(args)
    reference: dict = {}
    tick = time.perf_counter()
    dense_metrics = evaluate(dense, data, reference, record=True)
    log(f"dense: {ppls(dense_metrics)} ({time.perf_counter() - tick:.0f} s to evaluate)")
    rows = [row("dense", 0, len(decoder_stack(dense)[1]), dense, dense_metrics, 0.0, 0, [], data)]
    for method in args.methods:
        run = run_drop if method in DROP_METHODS else run_mka
        rows += run(method, dense, data, args.ks, reference, log)
        fresh = {(r["method"], r["k"]) for r in rows}
        store["rows"] = [r for r in store["rows"] if (r["method"], r["k"]) not in fresh] + rows
        store_path.write_text(json.dumps(store, indent=1) + "\n")
        render(store, args.out)
    print(table(store["rows"]))


if __name__ == "__main__":
    main()
