"""Do the training-free methods of compare_methods.md depend on its 16 calibration sequences?

Angular and ReplaceMe pick the block of k layers whose input and output are closest in angle at the last token of each
sequence (Gromov et al.; ReplaceMe reuses it): 16 sequences give that distance 16 samples, the papers use thousands.
This script collects the same statistics over a larger pool of calibration sequences (the wiki calibration split,
never the evaluation texts), shows the block each choice of sequences picks (the table's first 16, the whole pool,
and disjoint 16-sequence subsets of it), and evaluates angular's drop and ReplaceMe (its transform fitted on the
table's 16 sequences, and on the pool) on every block that came up, on the table's evaluation texts. ShortGPT (its
layers chosen by Block Influence on the 16, and on the pool) and ours (NPIB + parallel_pruned, calibrated on the 16,
and on the pool) complete the table's training-free methods on equal calibration.

    python bench/block_choice.py [--pool 256] [--ks 6 9]   -> bench/results/block_choice.md / .json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from common import add_data_arguments, evaluate, load_dense, setup_data
from compare_methods import mka_config
from lightning_mka.baselines import DropStatistics, collect_drop_statistics, select_layers_to_drop
from lightning_mka.merging import LayerMerger
from lightning_mka.replaceme import replace_block
from lightning_mka.surgery import decoder_stack, drop_layers

RESULTS = Path(__file__).with_name("results")
TABLE_SEQUENCES = 16  # compare_methods.md's calibration


def restricted(stats: DropStatistics, keep: torch.Tensor) -> DropStatistics:
    """The statistics of a subset of the sequences (angular / ReplaceMe read only the last-token states)."""
    return DropStatistics(stats.block_influence, stats.last_states[:, keep], stats.sequence_ids[keep])


def span(layers) -> str:
    """``[3, 12, 13, 14, 25, 26]`` -> ``3, 12-14, 25-26``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--pool", type=int, default=256, help="calibration sequences the statistics are collected over")
    parser.add_argument("--ks", nargs="+", type=int, default=[6, 9])
    parser.set_defaults(mmlu_per_topic=0)
    args = parser.parse_args()
    args.calibration_samples = args.pool
    torch.manual_seed(0)
    data = setup_data(args)
    assert len(data.calibration_ids) == args.pool, f"the calibration split holds {len(data.calibration_ids)} sequences, not {args.pool}"
    dense = load_dense(args)
    reference: dict = {}
    dense_metrics = evaluate(dense, data, reference, record=True)
    tick = time.perf_counter()
    with torch.no_grad():
        stats = collect_drop_statistics(decoder_stack(dense)[0], iter(data.calibration_dataloader()))
    collect_seconds = time.perf_counter() - tick
    table = stats.sequence_ids < TABLE_SEQUENCES
    subsets = [(stats.sequence_ids >= s) & (stats.sequence_ids < s + TABLE_SEQUENCES) for s in range(0, args.pool, TABLE_SEQUENCES)]
    depth = len(decoder_stack(dense)[1])

    def fit_batches(count: int):
        return iter(data._sequence_loader(data.calibration_ids[:count]))

    rows, choices = [], {}
    for k in args.ks:
        block = {name: select_layers_to_drop("angular", depth, k, restricted(stats, keep)) for name, keep in (("table 16", table), (f"pool {args.pool}", torch.ones_like(table)))}
        starts = [select_layers_to_drop("angular", depth, k, restricted(stats, keep))[0] for keep in subsets]
        choices[k] = {"table": block["table 16"], "pool": block[f"pool {args.pool}"], "subset_starts": starts}
        print(f"k={k}: table's 16 -> {block['table 16']}, pool -> {block[f'pool {args.pool}']}, disjoint 16-subsets start at {starts}", flush=True)
        for layers in sorted({tuple(b) for b in block.values()}):
            start, end = layers[0], layers[-1] + 1
            picked_by = [name for name, b in block.items() if tuple(b) == layers]
            variants = [("angular drop", None), ("ReplaceMe, fit on 16", TABLE_SEQUENCES), (f"ReplaceMe, fit on {args.pool}", args.pool)]
            for method, fit in variants:
                model = copy.deepcopy(dense)
                with torch.no_grad():
                    if fit is None:
                        drop_layers(model, list(range(start, end)))
                    else:
                        replace_block(model, start, end, fit_batches(fit))
                metrics = evaluate(model, data, reference, record=False)
                row = {"k": k, "block": [start, end - 1], "picked_by": picked_by, "method": method,
                       "wiki_ppl": metrics["wiki_ppl"], "lee_ppl": metrics["lee_ppl"]}
                rows.append(row)
                print(f"  layers {start}-{end - 1} ({', '.join(picked_by)}): {method}: wiki {row['wiki_ppl']:.2f} lee {row['lee_ppl']:.2f}", flush=True)
                del model
    # ShortGPT (Block Influence over every token) and ours (NPIB + parallel_pruned, compare_methods' variant) on the
    # table's 16 sequences and on the pool: every training-free method of the table, on equal calibration.
    with torch.no_grad():
        table_stats = collect_drop_statistics(decoder_stack(dense)[0], fit_batches(TABLE_SEQUENCES))
    for k in args.ks:
        picks = {"table 16": select_layers_to_drop("shortgpt", depth, k, table_stats), f"pool {args.pool}": select_layers_to_drop("shortgpt", depth, k, stats)}
        choices[k]["shortgpt"] = picks
        print(f"k={k}: ShortGPT on the table's 16 -> {picks['table 16']}, on the pool -> {picks[f'pool {args.pool}']}", flush=True)
        for layers in sorted({tuple(b) for b in picks.values()}):
            model = copy.deepcopy(dense)
            drop_layers(model, list(layers))
            metrics = evaluate(model, data, reference, record=False)
            picked_by = [name for name, b in picks.items() if tuple(b) == layers]
            rows.append({"k": k, "layers": list(layers), "picked_by": picked_by, "method": "ShortGPT drop", "wiki_ppl": metrics["wiki_ppl"], "lee_ppl": metrics["lee_ppl"]})
            print(f"  ShortGPT drop {span(layers)} ({', '.join(picked_by)}): wiki {metrics['wiki_ppl']:.2f} lee {metrics['lee_ppl']:.2f}", flush=True)
            del model
    for count in (TABLE_SEQUENCES, args.pool):
        model = copy.deepcopy(dense)
        tick = time.perf_counter()
        merger = LayerMerger(model, mka_config("mka-parallel-pruned", count), lambda count=count: fit_batches(count), torch.full((count,), args.seq_len))
        for k in sorted(args.ks):
            merger.merge_to(depth - k)
            seconds = time.perf_counter() - tick
            metrics = evaluate(model, data, reference, record=False)
            pairs = [f"{a}+{b}" for a, b in (step.to_json()["pair_original"] for step in merger.plan)]
            rows.append({"k": k, "pairs": pairs, "picked_by": [f"{'table' if count == TABLE_SEQUENCES else 'pool'} {count}"], "method": f"ours: NPIB + parallel_pruned, calibrated on {count}",
                         "wiki_ppl": metrics["wiki_ppl"], "lee_ppl": metrics["lee_ppl"], "compress_seconds": round(seconds, 1)})
            print(f"  ours on {count} sequences, k={k}: {pairs} ({seconds:.0f} s): wiki {metrics['wiki_ppl']:.2f} lee {metrics['lee_ppl']:.2f}", flush=True)
        merger.invalidate()
        del merger, model
    out = {"setup": {"pool": args.pool, "seq_len": args.seq_len, "eval_samples": args.eval_samples, "collect_seconds": round(collect_seconds, 1)},
           "dense": {"wiki_ppl": dense_metrics["wiki_ppl"], "lee_ppl": dense_metrics["lee_ppl"]}, "choices": {str(k): v for k, v in choices.items()}, "rows": rows}
    (RESULTS / "block_choice.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# The training-free methods on 16 calibration sequences (the table's) and on a pool of 256",
        "",
        f"Generated by `bench/block_choice.py --pool {args.pool}` (SmolLM2-135M, wiki calibration split, {args.seq_len} tokens per sequence; "
        f"evaluation: {args.eval_samples} x {args.seq_len} held-out wiki / lee tokens, as `compare_methods.md`; dense "
        f"{dense_metrics['wiki_ppl']:.2f} / {dense_metrics['lee_ppl']:.2f}).",
        "",
        "| k | block chosen from | first layer chosen by disjoint 16-sequence subsets |",
        "|---|---|---|",
    ]
    for k, c in choices.items():
        lines.append(f"| {k} | angular's block: table's 16: {c['table'][0]}-{c['table'][-1]}; pool of {args.pool}: {c['pool'][0]}-{c['pool'][-1]} | {c['subset_starts']} |")
    lines += ["", "| k | layers removed (ours: pairs merged, original indices) | picked by | method | wiki ppl | lee ppl |", "|---|---|---|---|---|---|"]
    for r in rows:
        removed = f"{r['block'][0]}-{r['block'][1]}" if "block" in r else span(r["layers"]) if "layers" in r else ", ".join(r["pairs"])
        lines.append(f"| {r['k']} | {removed} | {', '.join(r['picked_by'])} | {r['method']} | {r['wiki_ppl']:.2f} | {r['lee_ppl']:.2f} |")
    (RESULTS / "block_choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
