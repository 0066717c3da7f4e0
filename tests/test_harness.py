"""lm-eval-harness: the local MMLU task gives, question by question, the letter answers our own evaluation gives."""

import json
import random

import lightning as L
import numpy as np
import pytest
import torch

from conftest import WORDS, tiny_model
from lightning_mka.datamodules.calibration import tokenize_mmlu
from lightning_mka.evaluation import Evaluator, continuation_logprobs
from lightning_mka.errors import MKAError
from lightning_mka.text import LETTERS, MMLUQuestion, mmlu_letter_prompt

pytest.importorskip("lm_eval")

from lightning_mka.harness import local_mmlu_questions, mmlu_task, per_question_correct, run_harness, task_metrics  # noqa: E402


def letter_tokenizer():
    """The tiny word-level tokenizer plus the tokens of the letter format (A-D, "Answer", ":", ".")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in [*WORDS, *LETTERS, "Answer", ":", "."]:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def synthetic_questions(count=16):
    g = torch.Generator().manual_seed(0)
    words = lambda n: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))  # noqa: E731
    return [MMLUQuestion(question=words(6), choices=tuple(words(2) for _ in LETTERS), answer=i % 4, topic=["w1 w2", "w3", "w4 w5 w6"][i % 3])
            for i in range(count)]


def our_letter_answers(model, tokenizer, questions):
    topics = sorted({q.topic for q in questions})
    items = tokenize_mmlu(questions, {}, topics, tokenizer, shots=0)
    predictions = [int(continuation_logprobs(model, item.letter_context, item.letter_choices).argmax()) for item in items]
    evaluator = Evaluator(["mmlu"], len(topics), {}, record_reference=False)
    evaluator.step(model, items, "mmlu")
    return predictions, evaluator.summary()["mmlu_letter_acc"]


def lm_eval_letter_answers(output):
    samples = sorted(output["samples"]["mka_mmlu"], key=lambda s: s["doc_id"])
    return samples, [int(np.argmax([float(r[0]) for r in s["filtered_resps"]])) for s in samples]


def test_lm_eval_and_our_mmlu_agree_question_by_question(tmp_path, monkeypatch):
    import datasets.config

    user_cache = tmp_path / "user-hf-cache"  # the datasets cache a user has: the harness must leave nothing there
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", user_cache)
    model = tiny_model("llama", layers=2, vocab_size=160, initializer_range=0.5)  # weights large enough that the context decides the letter
    tokenizer = letter_tokenizer()
    questions = synthetic_questions()
    # lm-eval seeds Python's, NumPy's and torch's generators; the run's later draws (LoRA adapters injected after a
    # merge) must not depend on whether it ran: the harness leaves them as it found them.
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    output = run_harness(model, tokenizer, [mmlu_task(questions, tmp_path)], log_samples=True)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]
    samples, theirs = lm_eval_letter_answers(output)
    for q, sample in zip(questions, samples):  # the same prompt and continuations, character for character
        assert [tuple(a) for a in sample["arguments"]] == [(mmlu_letter_prompt(q, []), f" {letter}") for letter in LETTERS]
    ours, our_accuracy = our_letter_answers(model, tokenizer, questions)
    assert ours == theirs and len(set(ours)) > 1  # not a degenerate model that always says the same letter
    assert per_question_correct(output) == [p == q.answer for p, q in zip(ours, questions)]
    assert task_metrics(output)["lm_eval/mka_mmlu/acc"] == pytest.approx(our_accuracy)
    assert not user_cache.exists() and list((tmp_path / "datasets-cache").rglob("*.arrow"))


def test_an_unknown_lm_eval_task_is_refused_when_the_callback_is_built():
    from lightning_mka.callbacks import LMEvalCallback

    with pytest.raises(MKAError, match=r"lm-eval does not know the task\(s\) \['hellaswg'\] \('hellaswg': did you mean 'hellaswag'\?\); list them with `lm-eval ls tasks`"):
        LMEvalCallback(tasks=["mka_mmlu", "hellaswg"])
    assert LMEvalCallback(tasks=["mka_mmlu", "hellaswag"]).tasks == ["mka_mmlu", "hellaswag"]


def test_a_task_given_as_a_yaml_path_is_left_to_lm_eval(tmp_path):
    from lightning_mka.harness import check_task_names

    custom = tmp_path / "custom.yaml"
    custom.write_text("task: custom\n")
    check_task_names([str(custom)])  # lm-eval loads a path it does not know by name


def test_lm_eval_callback_measures_before_and_after_compression(tmp_path, tiny_corpus, tiny_heldout, monkeypatch, capsys):
    from lightning_mka.callbacks import LMEvalCallback, MergeCallback
    from lightning_mka.datamodules import CalibrationDataModule
    from lightning_mka.module import MKAModule

    model_dir = tmp_path / "tiny-letters"
    tiny_model("llama", layers=6, vocab_size=160, initializer_range=0.5).save_pretrained(model_dir)
    letter_tokenizer().save_pretrained(model_dir)
    questions = synthetic_questions(8)
    monkeypatch.setattr("lightning_mka.callbacks.lm_eval.local_mmlu_questions", lambda per_topic: questions)  # no asset needed
    L.seed_everything(0)
    module = MKAModule(model=str(model_dir))
    data = CalibrationDataModule(tokenizer=str(model_dir), calibration=str(tiny_corpus), calibration_samples=8, seq_len=32,
                                 batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[MergeCallback(target_layers=4, num_points=128), LMEvalCallback(tasks=["mka_mmlu"])])
    dense_answers, dense_accuracy = our_letter_answers(module.model, letter_tokenizer(), questions)
    trainer.validate(module, datamodule=data, verbose=False)
    from lightning_mka import signals

    assert signals._state["phase"] == "lm-eval on the compressed model"  # what a stop line says now (not "export to ...")
    merged_answers, merged_accuracy = our_letter_answers(module.model, letter_tokenizer(), questions)
    results = json.loads((tmp_path / "lm_eval.json").read_text())
    assert results["before"]["lm_eval/mka_mmlu/acc"] == pytest.approx(dense_accuracy)
    assert results["after"]["lm_eval/mka_mmlu/acc"] == pytest.approx(merged_accuracy)
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("lm_eval/mka_mmlu/acc"))
    assert row[1:] == [f"{dense_accuracy:.4g}", f"{merged_accuracy:.4g}"]


@pytest.mark.slow
def test_smollm2_lm_eval_and_our_mmlu_agree_question_by_question(smollm2_dir, tmp_path):
    from lightning_mka.loading import load_model, load_tokenizer

    model, tokenizer = load_model(str(smollm2_dir)), load_tokenizer(str(smollm2_dir))
    questions = local_mmlu_questions(1)[:12]  # the first evaluation question of 12 topics
    output = run_harness(model, tokenizer, [mmlu_task(questions, tmp_path)], log_samples=True)
    _, theirs = lm_eval_letter_answers(output)
    ours, accuracy = our_letter_answers(model, tokenizer, questions)
    assert ours == theirs
    assert task_metrics(output)["lm_eval/mka_mmlu/acc"] == pytest.approx(accuracy)
