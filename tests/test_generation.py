"""Teacher samples as training text: ``lightning_mka.generation`` and ``data.train_text``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer, write_corpus

from lightning_mka.errors import MKAError
from lightning_mka.generation import main, sample_texts


def _model_and_tokenizer():
    tokenizer = tiny_tokenizer()
    return tiny_model("llama", layers=2, vocab_size=len(tokenizer)), tokenizer


def test_samples_are_reproducible_seeded_and_leave_the_global_rng_alone():
    model, tokenizer = _model_and_tokenizer()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = sample_texts(model, tokenizer, count=5, new_tokens=12, batch_size=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    again = sample_texts(model, tokenizer, count=5, new_tokens=12, batch_size=2, seed=3)
    other = sample_texts(model, tokenizer, count=5, new_tokens=12, batch_size=2, seed=4)
    assert first == again
    assert first != other
    assert len(first) == 5 and len(set(first)) == 5
    # EOS is suppressed: every sample has its 12 new tokens (the word-level vocabulary decodes one word per token,
    # minus the few special tokens a random model may sample, which decoding drops).
    assert all(8 <= len(t.split()) <= 12 for t in first)
    assert model.training is False


def test_samples_follow_the_model_distribution():
    # A model whose head puts almost all mass on one word must produce (almost) only that word.
    model, tokenizer = _model_and_tokenizer()
    favourite = tokenizer.convert_tokens_to_ids("w7")
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        h = model.model(torch.tensor([[tokenizer.bos_token_id]])).last_hidden_state[0, -1]
        model.lm_head.weight.zero_()
        model.lm_head.weight[favourite] = 50.0 * torch.sign(h)  # logit 50 * sum|h| for w7, 0 for every other token
    texts = sample_texts(model, tokenizer, count=2, new_tokens=1, batch_size=2, seed=0)
    assert texts == ["w7", "w7"]


def test_settings_shipped_in_the_generation_config_do_not_reshape_the_samples():
    """Plain ancestral sampling whatever the model's generation_config.json says (an instruct model may ship a
    repetition penalty); the shipped config is back in place afterwards."""
    model, tokenizer = _model_and_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked distribution, which a repetition penalty visibly reshapes
    plain = sample_texts(model, tokenizer, count=4, new_tokens=30, batch_size=2, seed=0)
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.no_repeat_ngram_size = 2
    shipped = model.generation_config
    assert sample_texts(model, tokenizer, count=4, new_tokens=30, batch_size=2, seed=0) == plain
    assert model.generation_config is shipped and shipped.repetition_penalty == 1.3


def test_sampling_rejects_bad_arguments():
    model, tokenizer = _model_and_tokenizer()
    with pytest.raises(MKAError, match="temperature must be > 0"):
        sample_texts(model, tokenizer, count=1, new_tokens=4, temperature=0.0)
    with pytest.raises(MKAError, match=">= 1"):
        sample_texts(model, tokenizer, count=0, new_tokens=4)


def test_cli_writes_jsonl_atomically_and_refuses_bad_input(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "samples.jsonl"
    assert main(["--model", str(tiny_model_dir), "--out", str(out), "--tokens", "40", "--seq-len", "16", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["text"], str) and r["text"] for r in rows)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    before = out.read_bytes()
    capsys.readouterr()
    for argv, message in (
        (["--out", str(out)], "already exists; pass --overwrite"),
        (["--out", str(tmp_path / "samples.txt")], "must end in .jsonl"),
        (["--out", str(tmp_path / "x.jsonl"), "--temperature", "0"], "--temperature must be > 0"),
        (["--out", str(tmp_path / "y.jsonl"), "--tokens", "0"], "must be >= 1"),
        (["--out", str(out / "z.jsonl")], f"cannot be written: {str(out)!r} is a file, not a directory"),
        (["--out", "/proc/mka/z.jsonl"], "'/proc/mka/z.jsonl' is not writable ("),
    ):
        assert main(["--model", str(tiny_model_dir), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert out.read_bytes() == before
    assert not (tmp_path / "samples.txt").exists() and not (tmp_path / "x.jsonl").exists() and not (tmp_path / "y.jsonl").exists()


def test_train_text_feeds_training_and_leaves_calibration_unchanged(tmp_path, tiny_model_dir, tiny_corpus, tiny_heldout):
    from lightning_mka.datamodules import CalibrationDataModule

    samples = tmp_path / "samples.jsonl"
    other = write_corpus(tmp_path / "other.txt", documents=10, seed=7)
    samples.write_text("".join(json.dumps({"text": line}) + "\n" for line in other.read_text().split("\n\n") if line.strip()))
    common = dict(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=6, train_samples=4, seq_len=32, batch_size=4,
                  eval_texts=[str(tiny_heldout)], eval_samples=3)
    plain = CalibrationDataModule(**common)
    plain.setup()
    separate = CalibrationDataModule(**common, train_text=str(samples))
    separate.setup()
    assert torch.equal(plain.calibration_ids, separate.calibration_ids)
    assert separate.train_ids.shape == (4, 32)
    tokenizer = separate.tokenizer
    first_words = tokenizer.decode(separate.train_ids[0, :5])
    assert first_words.split() == other.read_text().split()[:5]
    assert not torch.equal(plain.train_ids, separate.train_ids)
    with pytest.raises(MKAError, match="train_text .* is also in data.eval_texts"):
        CalibrationDataModule(**{**common, "eval_texts": [str(samples)]}, train_text=str(samples))
    with pytest.raises(MKAError, match="is the calibration source: training would start on the calibration sequences; leave data.train_text unset"):
        CalibrationDataModule(**common, train_text=str(tiny_corpus))
    # an asset's calibration split (training) is disjoint from its evaluation split: wiki trains while wiki is evaluated
    assert CalibrationDataModule(**{**common, "eval_texts": ["wiki"]}, train_text="wiki").train_text == "wiki"
    with pytest.raises(MKAError, match="data.train_text 'lee' is held out for evaluation only"):
        CalibrationDataModule(**{**common, "eval_texts": ["wiki"]}, train_text="lee")


def test_a_failed_write_of_the_samples_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from lightning_mka.errors import MKAError
    from lightning_mka.generation import write_jsonl_atomic

    def full_disk(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_mka.export.os.replace", full_disk)  # where write_atomic renames
    with pytest.raises(MKAError, match=r"could not write '.*samples.jsonl' \(No space left on device\); free space"):
        write_jsonl_atomic(["a", "b"], tmp_path / "samples.jsonl")
    assert list(tmp_path.iterdir()) == []
    # Directories the write created are removed with it; one that existed before stays.
    (tmp_path / "kept").mkdir()
    with pytest.raises(MKAError, match="No space left on device"):
        write_jsonl_atomic(["a"], tmp_path / "kept" / "new" / "deeper" / "samples.jsonl")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []
