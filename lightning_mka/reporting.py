"""Run reports: parameter counts, peak memory, similarity heatmaps, the printed before/after summary."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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


def print_summary(results: dict, out: Path) -> None:
    before, after = results["metrics_before"], results["metrics_after"]
    lines = [f"[mka] {results['method']}: layers {results['layers_before']} -> {results['layers_after']}, parameters {results['params_before']:,} -> {results['params_after']:,}"]
    steps = results["merge_plan"]
    if steps and steps[0].get("op") == "drop":
        lines.append(f"[mka] plan: dropped original layers {steps[0]['remove']}")
    else:
        def how(s: dict) -> str:
            return f"a={s['alpha']:.2f}" if s.get("alpha") is not None else s.get("operator", "")

        lines.append("[mka] plan (original layers merged): " + ", ".join(f"{s['pair_original'][0]}+{s['pair_original'][1]} (S={s['score']:.3f}, {how(s)})" for s in steps))
    unhealed = results.get("metrics_after_merge_before_healing")
    for key in sorted(set(before) | set(after)):
        if key.endswith(("_ppl", "_acc", "_acc_macro", "_top1_agree")):
            b, a = before.get(key), after.get(key)
            fmt = (lambda v: "-" if v is None else f"{v:.4g}")
            merged = f"  merged, not healed {fmt(unhealed.get(key)):>10s}" if unhealed else ""
            lines.append(f"[mka] {key:24s} before {fmt(b):>10s}{merged}  after {fmt(a):>10s}")
    lines.append(
        f"[mka] compression {results['compression_seconds']} s = {results['compression_vs_one_pass']} x one calibration pass "
        f"({results['first_pass_seconds']} s); wall {results['seconds']['wall']} s; peak RSS {results['peak_rss_mb']:.0f} MB"
    )
    lines.append(f"[mka] wrote {out / 'merge_plan.json'}, {out / 'results.json'}" + (f", export {results['export_dir']}" if results["export_dir"] else ""))
    print("\n".join(lines), flush=True)
