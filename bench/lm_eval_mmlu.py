"""Our MMLU letter accuracy next to lm-eval-harness's on the same questions, question by question.

    flock /work/bench.lock .venv/bin/python bench/lm_eval_mmlu.py --per-topic 3

The first ``per-topic`` evaluation questions of every topic, zero-shot, on SmolLM2-135M (dense): ours is
``Evaluator`` (the ``mmlu_letter_acc`` of every run), lm-eval's is its MMLU template over the same questions
(``lightning_mka.harness.mmlu_task``). Prints both accuracies and the questions where the answers differ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_mka.datamodules.calibration import tokenize_mmlu  # noqa: E402
from lightning_mka.evaluation import continuation_logprobs  # noqa: E402
from lightning_mka.harness import local_mmlu_questions, mmlu_task, run_harness, task_metrics  # noqa: E402
from lightning_mka.loading import load_model, load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-topic", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    questions = local_mmlu_questions(args.per_topic)
    topics = sorted({q.topic for q in questions})
    tick = time.perf_counter()
    items = tokenize_mmlu(questions, {}, topics, tokenizer, shots=0)
    ours = [int(continuation_logprobs(model, it.letter_context, it.letter_choices).argmax()) for it in items]
    ours_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        output = run_harness(model, tokenizer, [mmlu_task(questions, directory)], log_samples=True)
    theirs_seconds = time.perf_counter() - tick
    samples = sorted(output["samples"]["mka_mmlu"], key=lambda s: s["doc_id"])
    theirs = [int(np.argmax([float(r[0]) for r in s["filtered_resps"]])) for s in samples]
    correct_ours = sum(p == q.answer for p, q in zip(ours, questions))
    correct_theirs = sum(p == q.answer for p, q in zip(theirs, questions))
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    print(f"model {args.model}: {len(questions)} questions ({args.per_topic} per topic, {len(topics)} topics), zero-shot letter format")
    print(f"ours:   {correct_ours}/{len(questions)} correct = {correct_ours / len(questions):.4f} ({ours_seconds:.0f} s)")
    print(f"lm-eval: {correct_theirs}/{len(questions)} correct = {task_metrics(output)['lm_eval/mka_mmlu/acc']:.4f} ({theirs_seconds:.0f} s)")
    print(f"same letter on {len(questions) - len(differ)}/{len(questions)} questions" + (f"; differ at {differ}" if differ else ""))


if __name__ == "__main__":
    main()
