"""Shared set-up for the benchmark scripts: the SmolLM2 asset, one calibration set, one evaluation."""

from __future__ import annotations

import argparse
import resource
import threading
import time
from contextlib import contextmanager

import psutil
import torch

from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.evaluation import Evaluator
from lightning_mka.loading import load_model


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration-samples", type=int, default=16, help="calibration sequences (wiki calibration articles)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=8, help="held-out sequences per text (wiki held-out articles, lee)")
    parser.add_argument("--mmlu-per-topic", type=int, default=1, help="MMLU evaluation questions per topic (57 topics)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward (lower it for large vocabularies)")
    parser.add_argument("--heldaside", type=int, default=0,
                        help="evaluate on this many HELD-ASIDE calibration-source sequences instead of the evaluation texts (choosing defaults)")


def setup_data(args) -> CalibrationDataModule:
    if args.threads:
        torch.set_num_threads(args.threads)
    data = CalibrationDataModule(
        tokenizer=args.model,
        calibration="wiki",
        calibration_samples=args.calibration_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        eval_texts=["wiki", "lee"],
        eval_samples=args.eval_samples,
        mmlu_per_topic=args.mmlu_per_topic,
    )
    data.prepare_data()
    data.setup()
    if getattr(args, "heldaside", 0):  # the tail of the calibration-source articles replaces the evaluation texts
        data.eval_texts = ["heldaside"]
        data.eval_ids = {"heldaside": heldaside_ids(data.tokenizer, args.heldaside, args.seq_len)}
        assert not any(torch.equal(a, b) for a in data.eval_ids["heldaside"] for b in data.calibration_ids)
    return data


def calibration_batches(data: CalibrationDataModule):
    return lambda: iter(data.calibration_dataloader())


def evaluate(model, data: CalibrationDataModule, reference: dict, record: bool) -> dict[str, float]:
    evaluator = Evaluator(data.val_names, len(data.mmlu_topics), reference, record_reference=record)
    return evaluator.run(model, data.val_dataloader())


def load_dense(args):
    return load_model(args.model)


@contextmanager
def peak_rss():
    """Peak resident memory (MB) of this process while the block runs, sampled every 20 ms."""
    process = psutil.Process()
    box = {"peak": process.memory_info().rss, "stop": False}

    def sample():
        while not box["stop"]:
            box["peak"] = max(box["peak"], process.memory_info().rss)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = {"mb": 0.0}
    try:
        yield result
    finally:
        box["stop"] = True
        thread.join()
        result["mb"] = max(box["peak"], process.memory_info().rss) / 2**20


def process_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def heldaside_ids(tokenizer, count: int = 16, seq_len: int = 512) -> torch.Tensor:
    """The LAST ``count`` packed sequences of the wiki calibration-source articles.

    Calibration and training read that source from its start (16 calibration sequences, then at most a few hundred
    training ones, of the ~1,060 it holds at 512 tokens), so its tail is text that neither sees and that is not the
    evaluation split either: the place to choose defaults (never the held-out wiki / lee evaluation texts).
    """
    from lightning_mka.datamodules.calibration import pack_sequences
    from lightning_mka.datamodules.sources import iter_texts

    packed = pack_sequences(iter_texts("wiki", "calibration"), tokenizer, seq_len, 10**9)
    return packed[-count:]
