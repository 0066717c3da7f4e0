"""Run reports: parameter counts, peak memory, similarity heatmaps, the printed before/after summary."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def similarity_heatmap(matrix: torch.Tensor, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    axis.set_xlabel("layer")
    axis.set_ylabel("layer")
    axis.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return figure


# Metrics compared across models, in this order of kinds (names come from the evaluation: wiki_ppl, lee_top1_agree...).
COMPARED_SUFFIXES = ("_ppl", "_top1_agree", "_acc", "_acc_macro")


def comparison_columns(results: dict) -> dict[str, dict[str, float]]:
    """One column per model of a ``results.json``: dense, merged not healed (when healing followed), compressed."""
    columns = {"dense": {"layers": results["layers_before"], "parameters": results["params_before"], **results["metrics_before"]}}
    after = {"layers": results["layers_after"], "parameters": results["params_after"]}
    if results.get("metrics_after_merge_before_healing"):
        columns["merged, not healed"] = {**after, **results["metrics_after_merge_before_healing"]}
    columns["compressed"] = {**after, **results["metrics_after"]}
    return columns


def _format(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "parameters":
        return f"{value / 1e6:.1f} M"
    if key == "layers":
        return str(int(value))
    return f"{value:.4g}"


def comparison_table(columns: dict[str, dict[str, float]]) -> str:
    """Before / after: one column per model, one row per metric (layers, parameters, then the compared metrics)."""
    keys: list[str] = []
    for metrics in columns.values():
        keys += [k for k in metrics if k not in keys]
    compared = [k for suffix in COMPARED_SUFFIXES for k in keys if k.endswith(suffix)]
    rows = [k for k in ("layers", "parameters") if k in keys] + compared + [k for k in keys if k.startswith("lm_eval/")]
    names = list(columns)
    cells = [["metric", *names]] + [[key, *(_format(key, columns[n].get(key)) for n in names)] for key in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(names) + 1)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in cells]
    rule = "-" * len(lines[0])
    return "\n".join([rule, lines[0], rule, *lines[1:], rule])


def print_summary(results: dict, out: Path) -> None:
    """What was done and where it was written (the before / after table is printed at the very end of the run)."""
    lines = [f"[mka] {results['method']}: layers {results['layers_before']} -> {results['layers_after']}, parameters {results['params_before']:,} -> {results['params_after']:,}"]
    steps = results["merge_plan"]
    if steps and steps[0].get("op") == "drop":
        lines.append(f"[mka] plan: dropped original layers {steps[0]['remove']}")
    else:
        def how(s: dict) -> str:
            return f"a={s['alpha']:.2f}" if s.get("alpha") is not None else s.get("operator", "")

        lines.append("[mka] plan (original layers merged): " + ", ".join(f"{s['pair_original'][0]}+{s['pair_original'][1]} (S={s['score']:.3f}, {how(s)})" for s in steps))
    ratio = results["compression_vs_one_pass"]
    passes = f"= {ratio} x one calibration pass ({results['first_pass_seconds']} s)" if ratio is not None else "(no calibration pass in this run)"
    lines.append(f"[mka] compression {results['compression_seconds']} s {passes}; wall {results['seconds']['wall']} s; peak RSS {results['peak_rss_mb']:.0f} MB")
    lines.append(f"[mka] wrote {out / 'merge_plan.json'}, {out / 'results.json'}" + (f", export {results['export_dir']}" if results["export_dir"] else ""))
    print("\n".join(lines), flush=True)
