"""Where text comes from: packaged assets, local files (streamed through ``datasets``) or hub datasets.

A source string is one of
- an asset name: ``wiki`` (calibration articles, or the held-out articles when evaluating), ``lee`` (evaluation
  only), ``mmlu`` (calibration-split questions with their answers; evaluation uses the other split);
- a local file, directory or glob of ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files;
- ``hf:ORG/NAME[:CONFIG][@SPLIT]`` for a dataset on a hub (streamed; needs a reachable hub).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

from lightning_mka.assets import asset_path
from lightning_mka.errors import MKAError
from lightning_mka.files import check_text_file
from lightning_mka.signals import process_temp_dir
from lightning_mka.text import mmlu_calibration_text, read_mmlu_jsonl, split_mmlu

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ROLES = ("calibration", "evaluation")


# The roles each text asset can play: lee is held out for evaluation only; mmlu is not a perplexity text.
ASSET_ROLES = {"wiki": ("calibration", "evaluation"), "lee": ("evaluation",), "mmlu": ("calibration",)}


def check_asset_role(name: str, role: str, what: str = "text") -> None:
    """One line when an asset is used in a role it cannot play (cheap: the datamodule checks before a run)."""
    if name not in ASSET_ROLES:
        raise MKAError(f"{what} {name!r} is a model asset, not a text; use wiki, lee or mmlu, or your own files")
    if role in ASSET_ROLES[name]:
        return
    if role == "calibration":
        raise MKAError(f"{what} {name!r} is held out for evaluation only; use 'wiki', 'mmlu' or your own files")
    raise MKAError(f"{what} {name!r} is not a perplexity text; evaluate MMLU with data.mmlu_per_topic > 0")


def _asset_texts(name: str, role: str) -> Iterator[str]:
    check_asset_role(name, role)
    if name == "wiki":
        part = "calibration" if role == "calibration" else "heldout"
        with open(asset_path("wiki"), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row["split"] == part:
                    yield row["text"]
    elif name == "lee":
        with open(asset_path("lee"), encoding="utf-8") as f:
            yield from (line.strip() for line in f if line.strip())
    elif name == "mmlu":
        for q in split_mmlu(read_mmlu_jsonl(asset_path("mmlu")))["calibration"]:
            yield mmlu_calibration_text(q)
    else:
        raise MKAError(f"asset {name!r} is not a text; use wiki, lee or mmlu")


def _local_files(source: str) -> list[str]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in _BUILDERS)
    else:
        files = sorted(glob.glob(str(path))) if any(c in source for c in "*?[") else ([str(path)] if path.exists() else [])
    return files


def local_source(source: str) -> tuple[list[str], str]:
    """The files of a local text source and the ``datasets`` builder that reads them; one line when there are none or
    they mix kinds. Cheap (no file is read): the datamodule checks every source with it before a run starts."""
    files = _local_files(source)
    if not files:
        raise MKAError(f"data source {source!r} is neither an asset (wiki, lee, mmlu) nor an existing file; check the path")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _BUILDERS:
        raise MKAError(f"data source {source!r} must be .txt, .jsonl, .json or .parquet files of one kind, got {sorted(suffixes)}")
    return files, _BUILDERS[suffixes.pop()]


def text_value(value, where: str, field: str) -> str | None:
    """A row's text: a string, or None for an empty row (skipped); any other type is one line naming the field."""
    if value is None or isinstance(value, str):
        return value
    raise MKAError(f"{where} has a {type(value).__name__} in field {field!r}, not text; set data.text_field to a field that holds strings")


def _hub_texts(spec: str, text_field: str) -> Iterator[str]:
    from datasets import load_dataset

    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        stream = load_dataset(name, config or None, split=split or "train", streaming=True)
        for row in stream:
            text = text_value(row[text_field], f"hub dataset {name!r}", text_field)
            if text:
                yield text
    except MKAError:
        raise
    except KeyError:
        raise MKAError(f"hub dataset {name!r} has no field {text_field!r}; set data.text_field") from None
    except Exception as err:  # hub errors come in many types; report them as one line
        raise MKAError(f"cannot stream hub dataset {name!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); check the name or use local files") from None


DATASETS_TEMP_PREFIX = "mka-datasets-"  # the throw-away datasets cache of a local-file stream


def iter_texts(source: str, role: str, text_field: str = "text") -> Iterator[str]:
    """Stream the documents of ``source`` for ``role`` (``calibration`` or ``evaluation``)."""
    from lightning_mka.assets import ASSETS

    if role not in ROLES:
        raise ValueError(role)
    if source in ASSETS:
        yield from _asset_texts(source, role)
        return
    if source.startswith("hf:"):
        yield from _hub_texts(source[3:], text_field)
        return
    files, builder = local_source(source)
    from datasets import load_dataset

    for file in files:  # binary garbage or another encoding: one line naming the file, before any tokenizing
        check_text_file(file, what=f"{role} file", fix="pass UTF-8 text (.txt) or JSON lines (.jsonl)")
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    # Streaming local files caches nothing, but datasets still leaves a lock file per set of files in the user's cache
    # (~/.cache/huggingface/datasets): a throw-away cache dir keeps that from growing run after run.
    with process_temp_dir(DATASETS_TEMP_PREFIX) as cache:
        try:
            stream = load_dataset(builder, data_files=files, split="train", streaming=True, cache_dir=cache, **kwargs)
            for row in stream:
                field = "text" if builder == "text" else text_field
                if field not in row:
                    raise MKAError(f"data source {source!r} has no field {field!r} (fields: {sorted(row)}); set data.text_field")
                text = text_value(row[field], f"data source {source!r}", field)
                if text:
                    yield text
        except MKAError:
            raise
        except Exception as err:
            raise MKAError(f"cannot read data source {source!r} ({type(err).__name__}); check that the files are valid {builder}") from None
