"""lm-eval-harness on an in-memory model, and a local (offline) MMLU task over our packaged questions (no Lightning).

Optional: ``pip install 'lightning-mka[lmeval]'``. lm-eval's ``HFLM`` wraps the model instance and its tokenizer, so
the model being compressed is measured as it is, with no export. ``mmlu_task`` is lm-eval's MMLU task (its default
template: the same description, question block, `` A``..`` D`` choices and ``acc`` metric) over our evaluation
split of the ``mmlu`` asset, written to a local JSON file: it runs without a hub. Ours scores the same prompts
(``lightning_mka.text.mmlu_letter_prompt``), so both give the same letter answer per question
(``tests/test_harness.py``).
"""

from __future__ import annotations

import functools
import json
import logging
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

from lightning_mka.execution import compute_device
from lightning_mka.errors import MKAError
from lightning_mka.progress import is_terminal
from lightning_mka.text import LETTERS, MMLUQuestion

LOCAL_MMLU = "mka_mmlu"  # the local task's name


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except Exception as err:
        raise MKAError(f"lm-eval tasks need lm-eval-harness ({type(err).__name__}: {err}); pip install 'lightning-mka[lmeval]'") from None


def mmlu_task(questions: list[MMLUQuestion], directory: str | Path, name: str = LOCAL_MMLU) -> dict[str, Any]:
    """An lm-eval task config (zero-shot) over ``questions``, whose data is written to ``directory/<name>.jsonl``.
    The Arrow copy that ``datasets`` makes of it stays in ``directory`` too (by default every run would leave one more
    in the user's ``~/.cache/huggingface/datasets``, keyed by a temporary file that never comes back).

    The fields and templates are lm-eval's ``mmlu`` ones (``tasks/mmlu/default``), the description with the topic of
    each question (lm-eval renders it per document), so one task covers every topic.
    """
    path = Path(directory) / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps({"question": q.question, "choices": list(q.choices), "answer": q.answer, "subject": q.topic}) + "\n")
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": str(Path(directory) / "datasets-cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "description": "The following are multiple choice questions (with answers) about {{subject}}.\n\n",
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
        "doc_to_choice": list(LETTERS),
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def local_mmlu_questions(per_topic: int) -> list[MMLUQuestion]:
    """The first ``per_topic`` evaluation questions of every topic (the ones ``data.mmlu_per_topic`` evaluates)."""
    from lightning_mka.assets import asset_path
    from lightning_mka.text import read_mmlu_jsonl, split_mmlu, take_per_topic

    return take_per_topic(split_mmlu(read_mmlu_jsonl(asset_path("mmlu")))["evaluation"], per_topic)


def run_harness(model, tokenizer, tasks: list, batch_size: int = 1, limit: int | float | None = None, log_samples: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` on the model instance (in eval mode, on its own device); returns lm-eval's output.

    No BOS token is added (as our evaluation tokenizes), and no bootstrap of standard errors (it costs minutes).
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    device = compute_device(model)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # lm-eval logs every task and request build at INFO
    try:
        # simple_evaluate seeds Python's, NumPy's and torch's generators (its own reproducibility); the run's draws
        # after it (e.g. LoRA adapters injected after a merge) must not depend on whether lm-eval ran.
        with _quiet_bars_off_terminal(), _global_rng_kept(device):
            wrapper = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device), add_bos_token=False)
            return simple_evaluate(model=wrapper, tasks=list(tasks), limit=limit, bootstrap_iters=0, log_samples=log_samples,
                                   task_manager=_task_manager(all(isinstance(t, dict) for t in tasks)))
    finally:
        model.train(was_training)


@contextmanager
def _global_rng_kept(device):
    import random

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@functools.lru_cache(maxsize=2)
def _task_manager(inline_only: bool):
    """lm-eval's task index, built once per process (it reads every task YAML lm-eval ships: seconds; simple_evaluate
    would build a new one per call). Inline task configs (``mmlu_task``) need none of it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=not inline_only)


def _known_tasks() -> frozenset:
    return frozenset(_task_manager(False).all_tasks)


def check_task_names(tasks: list) -> None:
    """Task names lm-eval does not know, refused in one line before any work (lm-eval would fail after the run's
    compression, with a traceback). Indexing lm-eval's tasks takes seconds, so only names other than ours are looked up."""
    names = [t for t in tasks if isinstance(t, str) and t != LOCAL_MMLU and not Path(t).expanduser().exists()]  # a path: lm-eval loads its YAML
    if not names:
        return
    import difflib

    known = _known_tasks()
    unknown = [t for t in names if t not in known]
    if unknown:
        hints = {t: difflib.get_close_matches(t, known, n=1) for t in unknown}
        hint = "; ".join(f"{t!r}: did you mean {m[0]!r}?" for t, m in hints.items() if m)
        raise MKAError(f"lm-eval does not know the task(s) {unknown}" + (f" ({hint})" if hint else "")
                       + f"; list them with `lm-eval ls tasks`, or use {LOCAL_MMLU} (offline MMLU)")


@contextmanager
def _quiet_bars_off_terminal():
    """lm-eval draws tqdm bars (carriage returns) whatever the stream; outside a terminal they are turned off."""
    if is_terminal():
        yield
        return
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface
    from tqdm import tqdm

    def quiet(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    with ExitStack() as stack:
        for module in (lm_eval.api.model, lm_eval.api.task, lm_eval.models.huggingface):
            stack.enter_context(patch.object(module, "tqdm", quiet))
        yield


def task_metrics(output: dict) -> dict[str, float]:
    """``{"lm_eval/<task>/<metric>": value}`` from lm-eval's results (standard errors and aliases left out)."""
    metrics = {}
    for task, values in output.get("results", {}).items():
        for key, value in values.items():
            metric = key.split(",")[0]
            if isinstance(value, (int, float)) and not metric.endswith("_stderr") and metric not in ("alias", "sample_len"):
                metrics[f"lm_eval/{task}/{metric}"] = float(value)
    return metrics


def per_question_correct(output: dict, task: str = LOCAL_MMLU) -> list[bool]:
    """Whether each question (in document order) was answered right, from an output with ``log_samples``."""
    samples = sorted(output["samples"][task], key=lambda s: s["doc_id"])
    return [bool(s["acc"]) for s in samples]
