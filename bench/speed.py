"""Cost of MKA on SmolLM2-135M, measured in one run on the same calibration set.

    .venv/bin/python bench/speed.py

(a) one forward pass of the transformer body over all calibration sequences (all layers);
(b) our whole iterative MKA run to 21 layers (points after every merge, suffix-only recomputation, diffusion maps,
    NPIB, merging), with the spec's exact rescoring and again with ``rescore_scope: merged`` (only the merged layer
    is recomputed after a merge);
(c) activation extraction the way the paper's public script does it, re-implemented as a reference: one full
    forward pass per layer per sample, each sample padded to 512 tokens. It costs L x N forwards, so it is timed on
    ``--reference-samples`` samples and scaled linearly to N (each sample's passes are identical work).
Prints seconds, peak RSS and the ratios (b)/(a) and (c)/(b); writes bench/results/speed.json.

    .venv/bin/python bench/speed.py --versus-shortgpt mka-parallel-pruned mka-parallel-pruned-merged-scope

instead times ShortGPT (statistics pass + drop) and each named recipe of ``bench/compare_methods.py`` down to
``--target-layers`` on the same calibration set, ShortGPT once before and once after the recipes (the machine may be
shared: both figures are printed), and writes bench/results/speed_vs_shortgpt.json with recipe / ShortGPT ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_data_arguments, calibration_batches, load_dense, peak_rss, setup_data  # noqa: E402

from lightning_mka.activations import hidden_of  # noqa: E402
from lightning_mka.baselines import collect_drop_statistics, select_layers_to_drop  # noqa: E402
from lightning_mka.merging import LayerMerger, MergeConfig  # noqa: E402
from lightning_mka.surgery import decoder_stack, drop_layers  # noqa: E402


@torch.no_grad()
def one_pass(model, batches) -> None:
    base, _ = decoder_stack(model)
    for batch in batches():
        base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


@torch.no_grad()
def public_script_extraction(model, sequences: torch.Tensor, pad_to: int, pad_id: int) -> torch.Tensor:
    """Reference mode: for every sample and every layer, a full forward pass that keeps that layer's input."""
    base, layers = decoder_stack(model)
    kept = []
    for sample in sequences:
        ids = torch.full((1, pad_to), pad_id, dtype=torch.long)
        ids[0, : len(sample)] = sample[:pad_to]
        mask = torch.zeros_like(ids)
        mask[0, : len(sample)] = 1
        for i in range(len(layers)):
            box = {}
            handle = layers[i].register_forward_pre_hook(lambda _m, args, kwargs, box=box: box.update(h=(args[0] if args else kwargs["hidden_states"])), with_kwargs=True)
            base(input_ids=ids, attention_mask=mask, use_cache=False)
            handle.remove()
            kept.append(hidden_of(box["h"])[0].float())
    return torch.stack(kept)


def versus_shortgpt(dense, data, batches, recipes: list[str], target: int, out: Path) -> None:
    """Seconds of ShortGPT and of each recipe to ``target`` layers, same data, one process; ratios to ShortGPT."""
    from compare_methods import mka_config

    n = len(data.calibration_ids)
    depth = len(decoder_stack(dense)[1])

    def shortgpt() -> float:
        model = copy.deepcopy(dense)
        tick = time.perf_counter()
        stats = collect_drop_statistics(decoder_stack(model)[0], batches())
        drop_layers(model, select_layers_to_drop("shortgpt", depth, depth - target, stats))
        return time.perf_counter() - tick

    result: dict = {"calibration": f"{n} x {data.seq_len} tokens", "target_layers": target, "threads": torch.get_num_threads()}
    first = shortgpt()
    for name in recipes:
        model = copy.deepcopy(dense)
        merger = LayerMerger(model, mka_config(name, n), batches, torch.full((n,), data.seq_len))
        tick = time.perf_counter()
        merger.merge_to(target)
        seconds = time.perf_counter() - tick
        stats = merger.stats
        result[name] = {
            "seconds": round(seconds, 2),
            "breakdown_s": {k: round(getattr(stats, f"{k}_seconds"), 2) for k in ("collect", "score", "select", "merge")},
            "layer_evaluations_for_points": stats.layer_evaluations,
            "plan": [list(s.pair_original) for s in merger.plan],
        }
        print(f"{name}: {seconds:.1f} s {result[name]['breakdown_s']}", flush=True)
        del model, merger
    second = shortgpt()
    result["shortgpt_s"] = [round(first, 2), round(second, 2)]
    mean = (first + second) / 2
    for name in recipes:
        result[name]["over_shortgpt"] = round(result[name]["seconds"] / mean, 2)
        print(f"{name} / shortgpt = {result[name]['seconds']:.1f} / {mean:.1f} = {result[name]['over_shortgpt']}")
    result["load_average_after"] = [round(x, 2) for x in __import__("os").getloadavg()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_vs_shortgpt.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--target-layers", type=int, default=21)
    parser.add_argument("--reference-samples", type=int, default=1, help="samples timed for (c), scaled to all")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--versus-shortgpt", nargs="+", metavar="RECIPE", help="time these compare_methods recipes against ShortGPT instead")
    args = parser.parse_args()
    args.mmlu_per_topic = 0
    dense = load_dense(args)
    data = setup_data(args)
    batches = calibration_batches(data)
    n = len(data.calibration_ids)

    one_pass(dense, batches)  # warm-up (allocator, kernels)
    if args.versus_shortgpt:
        versus_shortgpt(dense, data, batches, args.versus_shortgpt, args.target_layers, args.out)
        return
    with peak_rss() as mem_a:
        tick = time.perf_counter()
        one_pass(dense, batches)
        a = time.perf_counter() - tick

    def mka_run(config: MergeConfig):
        model = copy.deepcopy(dense)
        merger = LayerMerger(model, config, batches, torch.full((n,), data.seq_len))
        with peak_rss() as mem:
            tick = time.perf_counter()
            merger.merge_to(args.target_layers)
            seconds = time.perf_counter() - tick
        del model
        return merger, seconds, mem["mb"]

    merger, b, mem_b_mb = mka_run(MergeConfig())  # the spec: exact suffix rescoring after every merge
    mem_b = {"mb": mem_b_mb}
    fast, b_fast, mem_fast = mka_run(MergeConfig(rescore_scope="merged"))  # approximate: the merged layer only

    k = min(args.reference_samples, n)
    with peak_rss() as mem_c:
        tick = time.perf_counter()
        public_script_extraction(dense, data.calibration_ids[:k], 512, data.tokenizer.pad_token_id or 0)
        c_measured = time.perf_counter() - tick
    c = c_measured * n / k

    stats = merger.stats
    result = {
        "calibration": f"{n} x {data.seq_len} tokens",
        "merges": len(merger.plan),
        "a_one_pass_s": round(a, 2),
        "b_mka_s": round(b, 2),
        "b_breakdown_s": {"collect": round(stats.collect_seconds, 2), "score": round(stats.score_seconds, 2), "merge": round(stats.merge_seconds, 2)},
        "b_passes": {"full": stats.full_passes, "suffix": stats.suffix_passes, "layer_evaluations": stats.layer_evaluations},
        "b_merged_scope_s": round(b_fast, 2),
        "b_merged_scope_breakdown_s": {"collect": round(fast.stats.collect_seconds, 2), "score": round(fast.stats.score_seconds, 2)},
        "b_merged_scope_peak_rss_mb": round(mem_fast),
        "plan_suffix": [list(s.pair_original) for s in merger.plan],
        "plan_merged_scope": [list(s.pair_original) for s in fast.plan],
        "c_public_script_s": round(c, 1),
        "c_measured_on_samples": k,
        "peak_rss_mb": {"a": round(mem_a["mb"]), "b": round(mem_b["mb"]), "c": round(mem_c["mb"])},
        "b_over_a": round(b / a, 2),
        "b_merged_scope_over_a": round(b_fast / a, 2),
        "c_over_b": round(c / b, 2),
        "threads": torch.get_num_threads(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"(b)/(a) = {result['b_over_a']}   (b, rescore_scope merged)/(a) = {result['b_merged_scope_over_a']}   (c)/(b) = {result['c_over_b']}")


if __name__ == "__main__":
    main()
