"""Training text sampled from the teacher itself, for distillation that is not tied to one domain.

Healing a compressed model by KD on one corpus (say, Wikipedia) teaches the student the teacher's behaviour on that
corpus only; out-of-domain text recovers less. Unconditional samples from the dense model cover what the teacher
itself puts probability on, so KD on them pulls the student towards the teacher everywhere the teacher is fluent.
They cost one generation pass and no data access, and they never overlap any evaluation text.

``sample_texts`` is the math-free core (a model and a tokenizer in, strings out); ``main`` is the
``lightning-mka-sample`` command, which writes JSON lines (``{"text": ...}``) that ``data.train_text`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import GenerationConfig

from lightning_mka.errors import MKAError


@torch.no_grad()
def sample_texts(model, tokenizer, count: int, new_tokens: int, batch_size: int = 32, temperature: float = 1.0, seed: int = 0) -> list[str]:
    """``count`` unconditional samples of exactly ``new_tokens`` tokens each, started from the BOS token.

    Plain ancestral sampling (no top-k / top-p) at ``temperature``, so the samples follow the teacher's own
    distribution. End-of-text is suppressed so every sample is full length (packing then wastes nothing). Batch ``b``
    is seeded with ``seed + b``: the same arguments give the same texts, whatever ran before.
    """
    if count < 1 or new_tokens < 1 or batch_size < 1:
        raise MKAError(f"sampling needs count, new_tokens and batch_size >= 1, got {count}, {new_tokens}, {batch_size}")
    if not temperature > 0:
        raise MKAError(f"sampling temperature must be > 0, got {temperature}; use 1.0 for the teacher's own distribution")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise MKAError("the tokenizer has neither a BOS nor an EOS token to start samples from; pass a tokenizer that has one")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # generate() fills every setting the call leaves unset from the model's generation_config.json: a shipped
    # repetition_penalty, min_p or no_repeat_ngram_size would reshape the samples. Sample under a neutral one.
    shipped = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=shipped.bos_token_id, eos_token_id=shipped.eos_token_id, pad_token_id=shipped.pad_token_id
    )
    texts: list[str] = []
    try:
        for b, first in enumerate(range(0, count, batch_size)):
            rows = min(batch_size, count - first)
            ids = torch.full((rows, 1), start, dtype=torch.long, device=device)
            # fork_rng: the seeds are this call's own; the CPU and this device's generators are restored afterwards.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + b)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else start,
                )
            texts.extend(tokenizer.decode(row[1:], skip_special_tokens=True) for row in out.cpu())
    finally:
        model.generation_config = shipped
        model.train(was_training)
    return texts


def check_output_file(out: Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output file whose directory cannot be made or written (a file in the way, no
    permission, a read-only file system)."""
    from lightning_mka.export import writable_ancestor

    writable_ancestor(out, f"{flag} {str(out)!r}", "choose a writable directory")


def write_jsonl_atomic(texts: list[str], out: Path) -> None:
    """Write ``{"text": ...}`` lines atomically (``write_atomic``); an OS error (e.g. a full disk) is one line, and
    nothing is left behind."""
    from lightning_mka.export import write_atomic

    try:
        write_atomic(out, lambda f: f.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts))
    except OSError as err:
        raise MKAError(f"could not write {str(out)!r} ({err.strerror or err}); free space or choose another path, then rerun") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-mka-sample",
        description="Sample training text from a (dense) model for distillation; writes JSON lines for data.train_text.",
    )
    parser.add_argument("--model", default="smollm2-135m", help="teacher: asset name, local dir, .gguf or hub id (default: smollm2-135m)")
    parser.add_argument("--out", required=True, help="output .jsonl file (written atomically)")
    parser.add_argument("--tokens", type=int, default=131072, help="total sampled tokens (default: 131072)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default: 512)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    from lightning_mka import signals

    def body() -> int:
        out = Path(args.out).expanduser()
        if out.suffix != ".jsonl":
            raise MKAError(f"--out {args.out!r} must end in .jsonl (data.train_text reads JSON lines); e.g. --out samples.jsonl")
        if out.is_dir():
            raise MKAError(f"--out {args.out!r} is a directory; name a .jsonl file inside it")
        if out.exists() and not args.overwrite:
            raise MKAError(f"--out {args.out!r} already exists; pass --overwrite or choose another file")
        check_output_file(out)
        if args.tokens < 1 or args.seq_len < 2 or args.batch_size < 1:
            raise MKAError(f"--tokens, --seq-len and --batch-size must be >= 1, 2, 1; got {args.tokens}, {args.seq_len}, {args.batch_size}")
        if not args.temperature > 0:
            raise MKAError(f"--temperature must be > 0, got {args.temperature}; use 1.0 for the model's own distribution")
        from lightning_mka.loading import load_model, load_tokenizer

        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, args.dtype)
        if torch.cuda.is_available():
            model = model.cuda()
        count = -(-args.tokens // args.seq_len)
        texts = sample_texts(model, tokenizer, count, args.seq_len, args.batch_size, args.temperature, args.seed)
        write_jsonl_atomic(texts, out)
        print(f"wrote {len(texts)} samples of {args.seq_len} tokens ({len(texts) * args.seq_len} tokens) to {out}", flush=True)
        return 0

    return signals.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
