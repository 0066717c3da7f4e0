"""Training-step time on this CPU in fp32 against bf16-mixed (fp32 weights, bf16 matmuls under autocast), as the heal
recipes train: one forward + backward of the embedded SmolLM2 on a batch of random tokens, both precisions in one run
so the ratio holds on a noisy machine. bf16 pays off with AVX512-BF16 / AMX; without AVX-512 it falls to slow kernels.

    python bench/cpu_precision.py [--tokens 256] [--steps 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lightning_mka.loading import load_model


def step_seconds(model: torch.nn.Module, ids: torch.Tensor, bf16: bool, steps: int) -> float:
    """The fastest of ``steps`` forward + backward passes (after one warm-up pass)."""
    times = []
    for _ in range(steps + 1):
        tick = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tick)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    for option, value in (("--tokens", args.tokens), ("--steps", args.steps)):
        if value < 1:
            sys.exit(f"error: {option} {value} must be >= 1; e.g. {option} {parser.get_default(option[2:])}")
    torch.manual_seed(0)
    model = load_model("smollm2-135m").train()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    fp32 = step_seconds(model, ids, False, args.steps)
    bf16 = step_seconds(model, ids, True, args.steps)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"{model.config.num_hidden_layers} layers, 1 x {args.tokens} tokens, forward + backward: "
          f"fp32 {fp32:.2f} s, bf16-mixed {bf16:.2f} s, bf16-mixed / fp32 = {bf16 / fp32:.1f}x")


if __name__ == "__main__":
    main()
