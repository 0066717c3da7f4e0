"""Healing SmolLM2-135M after depth compression: starts x losses, the same training tokens, optimizer and budget.

    python bench/heal.py starts                       # build the compressed starts once (cache dir)
    python bench/heal.py run --start ours --k 9 --loss kd [--heldaside 16]   # one run; rows merged into the JSON
    python bench/heal.py render                        # heal.md + heal.png from the stored rows

Every run is one process that fine-tunes one start with ``MKAModule.training_step`` (the product's loss: KD from
the frozen dense teacher, or the plain LM loss) in a Lightning ``Trainer`` and evaluates it at token checkpoints,
writing the JSON after each checkpoint (partial results survive an interrupted run).

Data: training sequences are the wiki calibration-source sequences that follow the 16 calibration ones (disjoint
from calibration, from the held-out wiki articles and Lee, and from the held-aside tail of the calibration source).
Evaluation: held-out wiki articles and Lee (8 x 512 tokens each, fp32, top-1 agreement with the dense model), or
with ``--heldaside N`` the last N calibration-source sequences (probes that choose learning rate, temperature,
trainable set: never the evaluation split).

Starts (k layers removed of 30): ``ours`` NPIB pairs + ``parallel_pruned`` (merged here once); ``norefit`` the same
without the operator's least-squares refit; ``replaceme`` ReplaceMe's block and linear transform; ``paper`` the paper's
average merge (its plan replayed from ``compare_methods.json``: pairs and alphas as recorded there, alphas rounded to
0.01); ``shortgpt`` / ``angular`` / ``tail`` drop the layers ``compare_methods.json`` recorded for them (same
calibration); ``dense`` (k=0) for the "dense fine-tuned on the same tokens" row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heldaside_ids  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("HEAL_CACHE", "/tmp/lightning-mka-heal"))
SEQ, BATCH, CAL = 512, 4, 16
TOKENS_PER_STEP = SEQ * BATCH
DENSE = "smollm2-135m"


def compare_rows() -> list[dict]:
    return json.loads((RESULTS / "compare_methods.json").read_text())["rows"]


def original_to_current(plan_strings: list[str], depth: int = 30) -> list[dict]:
    """``['15+16@0.75', ...]`` (original indices) -> replayable records with current indices."""
    origins = [[i] for i in range(depth)]
    records = []
    for text in plan_strings:
        pair, alpha = text.split("@")
        a, b = (int(x) for x in pair.split("+"))
        l = next(i for i, o in enumerate(origins) if a in o)
        m = next(i for i, o in enumerate(origins) if b in o)
        records.append({"pair": [l, m], "operator": "average", "alpha": float(alpha)})
        origins[l] = sorted(origins[l] + origins[m])
        del origins[m]
    return records


def start_dir(start: str, k: int) -> Path:
    return CACHE / f"{start}-k{k}"


def cmd_starts(args) -> None:
    from lightning_mka.export import export_pretrained
    from lightning_mka.loading import load_model, load_tokenizer
    from lightning_mka.merging import LayerMerger, replay_plan
    from lightning_mka.replaceme import replace_block
    from lightning_mka.surgery import drop_layers

    CACHE.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer("smollm2-135m")
    # angular256 = angular's drop of the block chosen on 256 calibration sequences (bench/results/block_choice.json):
    # compare_methods.json's angular block was chosen on 16, and at k = 9 it is another block (block_choice.md).
    choices = json.loads((RESULTS / "block_choice.json").read_text())["choices"] if (RESULTS / "block_choice.json").exists() else {}
    for k in args.ks:
        out = start_dir("angular256", k)
        if out.exists() or str(k) not in choices:
            continue
        remove = choices[str(k)]["pool"]
        model = load_model("smollm2-135m")
        drop_layers(model, remove)
        export_pretrained(model, tokenizer, out, extra_files={"mka_merge_plan.json": {"steps": [{"op": "drop", "remove": remove}]}})
        print(f"angular256 k={k}: drop {remove}", flush=True)
    if args.only == "angular256":
        return
    if args.only in ("ours256", "norefit256"):
        # ours256 = NPIB + parallel_pruned (with its refit, as compare_methods' variant) calibrated on the same 256
        # sequences as angular256's block choice (bench/block_choice.md: 35.21 / 98.78 at k = 9 before healing, against
        # 44.09 / 140.7 on 16); norefit256 = the same without the least-squares refit (the merge the merge + distill
        # recipe ships, whose start heals better than the refit's). About 24 min and 18 GB on 2 CPU cores (every
        # layer's cached input).
        from compare_methods import mka_config as variant_config
        from lightning_mka.datamodules import CalibrationDataModule

        pool, start = 256, args.only
        variant = "mka-parallel-pruned" if start == "ours256" else "mka-parallel-pruned-norefit"
        data = CalibrationDataModule(tokenizer="smollm2-135m", calibration="wiki", calibration_samples=pool, seq_len=SEQ, batch_size=BATCH,
                                     eval_texts=["wiki", "lee"], eval_samples=8)
        data.prepare_data()
        data.setup()
        assert len(data.calibration_ids) == pool
        held = heldaside_ids(data.tokenizer, 8, SEQ)  # the probes' held-aside text stays outside the calibration
        assert not any(torch.equal(a, b) for a in held for b in data.calibration_ids)
        todo = [k for k in sorted(args.ks) if not start_dir(start, k).exists()]
        if todo:
            model = load_model("smollm2-135m")
            merger = LayerMerger(model, variant_config(variant, pool), lambda: iter(data.calibration_dataloader()), torch.full((pool,), SEQ))
            tick = time.perf_counter()
            for k in todo:
                merger.merge_to(30 - k)
                plan = [s.to_json() for s in merger.plan]
                export_pretrained(model, tokenizer, start_dir(start, k), extra_files={"mka_merge_plan.json": {"steps": plan}})
                print(f"{start} k={k}: {[s['pair_original'] for s in plan]} ({time.perf_counter() - tick:.0f} s)", flush=True)
        return
    rows = compare_rows()
    for k in args.ks:
        for method in ("shortgpt", "angular", "tail"):
            out = start_dir(method, k)
            if out.exists():
                continue
            remove = next(r["plan"] for r in rows if r["method"] == method and r["k"] == k)
            model = load_model("smollm2-135m")
            drop_layers(model, remove)
            export_pretrained(model, tokenizer, out, extra_files={"mka_merge_plan.json": {"steps": [{"op": "drop", "remove": remove}]}})
            print(f"{method} k={k}: drop {remove}", flush=True)
        out = start_dir("replaceme", k)
        if not out.exists():  # ReplaceMe: the block compare_methods.json recorded, its linear transform fit on the same calibration
            remove = next(r["plan"] for r in rows if r["method"] == "replaceme" and r["k"] == k)
            model = load_model("smollm2-135m")
            record = replace_block(model, remove[0], remove[-1] + 1, iter(data_module(0).calibration_dataloader()))
            export_pretrained(model, tokenizer, out, extra_files={"mka_merge_plan.json": {"steps": [{"op": "drop", "method": "replaceme", "remove": remove, **record}]}})
            print(f"replaceme k={k}: block {remove}", flush=True)
        out = start_dir("paper", k)
        if not out.exists():
            plan = original_to_current(next(r["plan"] for r in rows if r["method"] == "mka" and r["k"] == k))
            model = load_model("smollm2-135m")
            replay_plan(model, plan)
            export_pretrained(model, tokenizer, out, extra_files={"mka_merge_plan.json": {"steps": plan}})
            print(f"paper k={k}: {plan}", flush=True)
    # ours = NPIB + parallel_pruned; norefit = the same operator without its least-squares refit (importance pruning
    # only, the same size): the start that tells whether the refit on calibration text is what heals slowly.
    for start, variant in (("ours", "mka-parallel-pruned"), ("norefit", "mka-parallel-pruned-norefit")):
        todo = [k for k in sorted(args.ks) if not start_dir(start, k).exists()]
        if not todo:
            continue
        from compare_methods import mka_config

        data = data_module(0)
        model = load_model("smollm2-135m")
        merger = LayerMerger(model, mka_config(variant, CAL), lambda: iter(data.calibration_dataloader()), torch.full((CAL,), SEQ))
        tick = time.perf_counter()
        for k in todo:
            merger.merge_to(30 - k)
            plan = [s.to_json() for s in merger.plan]
            export_pretrained(model, tokenizer, start_dir(start, k), extra_files={"mka_merge_plan.json": {"steps": plan}})
            print(f"{start} k={k}: {[s['pair_original'] for s in plan]} ({time.perf_counter() - tick:.0f} s)", flush=True)
    # npibdrop = NPIB's groups (the no-refit plan's) with a drop instead of a merge: each group keeps its first layer
    # whole, the rest go. It parts the two halves of our pipeline: the layers NPIB picks, and what the merge does to them.
    for k in args.ks:
        out = start_dir("npibdrop", k)
        if out.exists():
            continue
        remove = npib_drop_layers(json.loads((start_dir("norefit", k) / "mka_merge_plan.json").read_text())["steps"])
        model = load_model("smollm2-135m")
        drop_layers(model, remove)
        export_pretrained(model, tokenizer, out, extra_files={"mka_merge_plan.json": {"steps": [{"op": "drop", "remove": remove}]}})
        print(f"npibdrop k={k}: drop {remove}", flush=True)
    # blockmerge = the other half of that experiment: ShortGPT's layer choice, merged by our operator (no refit, as
    # the merge + distill recipe ships) instead of dropped. Each removed layer joins its nearest kept layer.
    todo = [k for k in args.ks if not start_dir("blockmerge", k).exists()]
    if todo:
        from compare_methods import mka_config

        data = data_module(0)
        for k in todo:
            groups = block_groups(next(r["plan"] for r in rows if r["method"] == "shortgpt" and r["k"] == k))
            model = load_model("smollm2-135m")
            merger = LayerMerger(model, mka_config("mka-parallel-pruned-norefit", CAL), lambda: iter(data.calibration_dataloader()), torch.full((CAL,), SEQ))
            plan = merge_groups(merger, groups)
            export_pretrained(model, tokenizer, start_dir("blockmerge", k), extra_files={"mka_merge_plan.json": {"steps": plan}})
            print(f"blockmerge k={k}: groups {groups}", flush=True)


def block_groups(remove: list[int], depth: int = 30) -> list[list[int]]:
    """Each removed layer with its nearest kept layer (the earlier one on a tie): the groups a merge folds into one
    layer each so that exactly the drop's layers disappear. Groups are contiguous runs of original layers."""
    kept = [i for i in range(depth) if i not in set(remove)]
    home = {i: i for i in kept} | {r: min(kept, key=lambda j: (abs(j - r), j)) for r in remove}
    groups: dict[int, list[int]] = {}
    for i in range(depth):
        groups.setdefault(home[i], []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def merge_groups(merger, groups: list[list[int]]) -> list[dict]:
    """Merge every group of contiguous original layers into one layer with ``merger``'s operator, pair by pair from
    its first layer (no similarity scoring); returns the replayable plan."""
    steps = []
    for group in groups:
        for _ in group[1:]:
            l = next(i for i, o in enumerate(merger.origins) if o[0] == group[0])
            steps.append(merger.merge(l, l + 1).to_json())
    return steps


def npib_drop_layers(steps: list[dict]) -> list[int]:
    """The original layers a drop removes to leave NPIB's merge groups one whole layer each (the first of a group)."""
    from lightning_mka.finetuning import current_origins

    return sorted(i for group in current_origins(30, steps) for i in group[1:])


TEACHER_SAMPLES = CACHE / "teacher-samples.jsonl"


def data_module(train_steps: int, heldaside: int = 0, train_text: str = "wiki", batch: int = BATCH):
    """Training sequences from the wiki calibration source (after the calibration ones) or from teacher samples.

    Probes (``heldaside``) evaluate on two held-aside texts that no run trains or is evaluated on: the last
    ``heldaside`` wiki calibration-source sequences (in domain) and the first 8 packed sequences of MMLU's
    calibration-split questions (out of domain; MMLU's evaluation split is never read here).
    """
    from lightning_mka.datamodules import CalibrationDataModule
    from lightning_mka.datamodules.calibration import pack_sequences
    from lightning_mka.datamodules.sources import iter_texts

    source = str(TEACHER_SAMPLES) if train_text == "teacher" else None
    data = CalibrationDataModule(tokenizer="smollm2-135m", calibration="wiki", calibration_samples=CAL, train_samples=train_steps * batch,
                                 train_text=source, seq_len=SEQ, batch_size=batch, eval_texts=["wiki", "lee"], eval_samples=8)
    data.prepare_data()
    data.setup()
    if train_text == "mix":
        # Half wiki, half teacher samples, the same total (the loader shuffles): the wiki half is the first half of the
        # wiki training sequences, so a mix row reads a prefix of what a wiki row reads.
        n = train_steps * batch
        teacher = pack_sequences(iter_texts(str(TEACHER_SAMPLES), "calibration"), data.tokenizer, SEQ, n // 2)
        assert len(teacher) == n // 2, f"{len(teacher)} teacher sequences, {n // 2} needed: bench/heal.py sample --tokens {n // 2 * SEQ}"
        wiki = data.train_ids[: n - n // 2]
        order = [wiki[i // 2] if i % 2 == 0 else teacher[i // 2] for i in range(n)]
        data.train_ids = torch.stack(order)
    assert len(data.train_ids) == train_steps * batch, f"{len(data.train_ids)} training sequences for {train_steps} steps"
    if heldaside:
        data.eval_texts = ["heldaside", "heldaside_mmlu"]
        data.eval_ids = {"heldaside": heldaside_ids(data.tokenizer, heldaside, SEQ),
                         "heldaside_mmlu": pack_sequences(iter_texts("mmlu", "calibration"), data.tokenizer, SEQ, 8)}
        used = torch.cat([data.calibration_ids, data.train_ids])
        assert not any(torch.equal(a, b) for a in data.eval_ids["heldaside"] for b in used)
    return data


def dense_reference(data, heldaside: int) -> dict:
    """Top-1 predictions of the dense model on the evaluation sequences (cached), and its metrics."""
    from lightning_mka.evaluation import Evaluator
    from lightning_mka.loading import load_model

    path = CACHE / f"dense-reference-{'heldaside%d-mmlu' % heldaside if heldaside else 'eval'}.pt"
    if path.exists():
        return torch.load(path)
    reference: dict = {}
    metrics = Evaluator(data.val_names, 1, reference, record_reference=True).run(load_model(DENSE), data.val_dataloader())
    store = {"reference": reference, "metrics": metrics}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(store, path)
    return store


def load_store(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def save_row(path: Path, row: dict) -> None:
    store = load_store(path)
    store["rows"] = [r for r in store["rows"] if r["name"] != row["name"]] + [row]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(store, indent=1) + "\n")
    os.replace(tmp, path)


def cmd_run(args) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_mka.evaluation import Evaluator
    from lightning_mka.module import MKAModule

    torch.set_num_threads(args.threads or torch.get_num_threads())
    # Checkpoints count 2,048-token units whatever the batch, so rows with different batch sizes compare at equal tokens.
    if args.batch_size < 1 or any(c * BATCH % args.batch_size for c in args.checkpoints):
        sys.exit(f"error: --batch-size {args.batch_size} must be >= 1 and divide {BATCH} x every checkpoint; e.g. --batch-size 1, 2 or 4")
    if args.rounds < 1 or args.merge_every < 1:
        sys.exit(f"error: --rounds {args.rounds} and --merge-every {args.merge_every} must be >= 1; e.g. --rounds 3 --merge-every 32")
    if not 0 < args.adam_beta2 < 1:
        sys.exit(f"error: --adam-beta2 {args.adam_beta2:g} must be in (0, 1); e.g. --adam-beta2 0.95 (AdamW's default: 0.999)")
    if not 0 < args.merged_lr_scale < float("inf"):
        sys.exit(f"error: --merged-lr-scale {args.merged_lr_scale:g} must be a finite number > 0; e.g. --merged-lr-scale 2 (1: one rate)")
    progressive = args.rounds > 1
    if progressive and args.start not in ("ours", "norefit"):
        sys.exit(f"error: --rounds {args.rounds} merges in the fit, with our merge: use --start ours or norefit")
    if args.start != "dense" and not progressive and not start_dir(args.start, args.k).exists():
        sys.exit(f"error: no cached start {start_dir(args.start, args.k)}; build it first: bench/heal.py starts --ks {args.k}")
    to_step = {c: c * BATCH // args.batch_size for c in args.checkpoints}
    steps = max(to_step.values())
    tokens_per_step = args.batch_size * SEQ
    data = data_module(steps, args.heldaside, args.train_text, args.batch_size)
    dense = dense_reference(data, args.heldaside)
    # Progressive: the dense model merged in the fit, ceil(k / rounds) merges after the dense validation and after every
    # --merge-every steps, KD in between (MergeCallback as in `lightning-mka fit`), instead of healing a cached start.
    source = DENSE if args.start == "dense" or progressive else str(start_dir(args.start, args.k))
    kd = args.loss == "kd"
    options = dict(teacher=DENSE, temperature=args.temperature, lm_weight=args.lm_weight, hidden_weight=args.hidden_weight) if kd else {}
    L.seed_everything(0)
    # A second-moment decay other than AdamW's default goes through the module's optimizer factory, as `optimizer:`
    # in a fit config would (the module still scales the merged layers' rate).
    optimizer = None if args.adam_beta2 == 0.999 else (lambda params: torch.optim.AdamW(params, lr=args.lr, betas=(0.9, args.adam_beta2)))
    module = MKAModule(model=source, optimizer=optimizer, learning_rate=args.lr, trainable=args.trainable, tail_layers=args.tail_layers,
                       lr_schedule=args.schedule, warmup_steps=args.warmup, min_lr_ratio=0.1, merged_lr_scale=args.merged_lr_scale, **options)
    name = args.name or f"{args.start}-k{args.k}-{args.loss}" + (f"-progressive{args.rounds}" if progressive else "") + (f"-{args.trainable}" if args.trainable != "all" else "") + (f"-b{args.batch_size}" if args.batch_size != BATCH else "") + ("" if args.train_text == "wiki" else f"-{args.train_text}")
    out = RESULTS / ("heal_probes.json" if args.heldaside else "heal.json")
    row = {"name": name, "start": args.start, "k": args.k, "loss": args.loss, "trainable": args.trainable, "lr": args.lr, "schedule": args.schedule,
           "warmup": args.warmup, "temperature": args.temperature if kd else None, "lm_weight": args.lm_weight if kd else None,
           "hidden_weight": args.hidden_weight if kd else None, **({"merged_lr_scale": args.merged_lr_scale} if args.merged_lr_scale != 1.0 else {}), **({"adam_beta2": args.adam_beta2} if args.adam_beta2 != 0.999 else {}), "precision": args.precision, "tokens_per_step": tokens_per_step, "train_text": args.train_text,
           **({"rounds": args.rounds, "merge_every": args.merge_every} if progressive else {}), "dense": dense["metrics"], "checkpoints": [], "complete": False, "planned_steps": steps}

    def evaluate(step: int, seconds: float) -> None:
        model = module.model
        was = model.training
        model.eval()
        tick = time.perf_counter()
        metrics = Evaluator(data.val_names, 1, dense["reference"], record_reference=False).run(model, data.val_dataloader())
        model.train(was)
        row["checkpoints"].append({"step": step, "tokens": step * tokens_per_step, "train_seconds": round(seconds, 1), "eval_seconds": round(time.perf_counter() - tick, 1), **metrics})
        row["complete"] = step >= steps
        save_row(out, row)
        print(f"{name} step {step} ({step * tokens_per_step} tokens, {seconds:.0f} s training): "
              + " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.endswith(("_ppl", "_agree"))), flush=True)

    class Checkpoints(Callback):
        def __init__(self):
            self.seconds = 0.0
            self.tick = 0.0

        def on_train_start(self, trainer, pl_module):
            if 0 in args.checkpoints:
                evaluate(0, 0.0)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.tick = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seconds += time.perf_counter() - self.tick
            if trainer.global_step in to_step.values() and trainer.global_step > 0:
                evaluate(trainer.global_step, self.seconds)

    common = dict(accelerator="cpu", max_steps=steps, precision=args.precision, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    if not progressive:
        trainer = L.Trainer(**common, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Checkpoints()])
        trainer.fit(module, train_dataloaders=data.train_dataloader())
        return
    from lightning_mka.callbacks import MergeCallback

    merge = MergeCallback(target_layers=30 - args.k, merges_per_validation=-(-args.k // args.rounds), similarity="npib", num_points=1024,
                          merge_operator="parallel_pruned", prune_refit=args.start == "ours", seed=0, evaluate_before_healing=False)
    root = CACHE / "progressive-runs" / name  # the callback's plan and heatmaps: never into the repository
    trainer = L.Trainer(**common, num_sanity_val_steps=-1, val_check_interval=args.merge_every, check_val_every_n_epoch=None,
                        default_root_dir=str(root), callbacks=[merge, Checkpoints()])
    trainer.fit(module, datamodule=data)
    assert len(module.merge_plan) == args.k, module.merge_plan


# ---- report -----------------------------------------------------------------------------------------------------

LABELS = {"ours": "ours: NPIB + parallel_pruned", "norefit": "NPIB + parallel_pruned without refit", "paper": "paper: NPIB + average", "shortgpt": "ShortGPT",
          "angular": "angular", "angular256": "angular, block chosen on 256 sequences", "ours256": "ours: NPIB + parallel_pruned, calibrated on 256 sequences",
          "norefit256": "NPIB + parallel_pruned without refit, calibrated on 256 sequences", "replaceme": "ReplaceMe", "tail": "tail",
          "npibdrop": "NPIB groups, dropped (first layer of each kept)",
          "blockmerge": "ShortGPT's layers, merged (ours, no refit) into the nearest kept layer", "dense": "dense fine-tuned (control)"}


def cmd_sample(args) -> None:
    """Unconditional samples of the dense model (seed 0, T = 1), the ``--train-text teacher`` training text."""
    from lightning_mka.generation import main as sample_main

    argv = ["--model", DENSE, "--out", str(TEACHER_SAMPLES), "--tokens", str(args.tokens), "--seq-len", str(SEQ), "--batch-size", str(args.batch_size), "--dtype", "bfloat16"]
    if TEACHER_SAMPLES.exists():
        print(f"{TEACHER_SAMPLES} exists; delete it to sample again")
        return
    tick = time.perf_counter()
    code = sample_main(argv)
    print(f"sampling took {time.perf_counter() - tick:.0f} s")
    sys.exit(code)


def fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def rounds(row: dict) -> str:
    return f", merged in the fit in {row['rounds']} rounds {row['merge_every']} steps apart" if row.get("rounds") else ""


def loss_label(row: dict, hidden: bool = True) -> str:
    if row["loss"] == "lm":
        return "lm"
    return (f"kd T={row['temperature']:g}" + (f" +hidden {row['hidden_weight']:g}" if hidden and row["hidden_weight"] else "")
            + (f" +LM {row['lm_weight']:g}" if row.get("lm_weight") else ""))


def lr_label(row: dict) -> str:
    return (f"{row['lr']:g}" + (f" (merged x{row['merged_lr_scale']:g})" if row.get("merged_lr_scale") else "")
            + (f" (beta2 {row['adam_beta2']:g})" if row.get("adam_beta2") else ""))


def cmd_render(args) -> None:
    store = load_store(RESULTS / "heal.json")
    rows = store["rows"]
    dense = rows[0]["dense"] if rows else {"wiki_ppl": float("nan"), "lee_ppl": float("nan")}
    budgets = sorted({c["tokens"] for r in rows for c in r["checkpoints"]})
    if not rows:
        dense = {"wiki_ppl": float("nan"), "lee_ppl": float("nan")}
    lines = ["| k | start | loss | trainable | train text | batch x lr | tokens | wiki ppl | lee ppl | wiki top-1 agree | lee top-1 agree | wiki / dense | lee / dense | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| 0 | dense | - | - | - | - | 0 | {dense['wiki_ppl']:.2f} | {dense['lee_ppl']:.2f} | 1.000 | 1.000 | 1.00 | 1.00 | - |"]
    order = {start: i for i, start in enumerate(LABELS)}  # the table lists starts in LABELS' order
    for r in sorted(rows, key=lambda r: (r["k"] if r["start"] != "dense" else 99, order.get(r["start"], 9), r["loss"], r["name"])):
        for c in r["checkpoints"]:
            lines.append(
                f"| {r['k']} | {LABELS.get(r['start'], r['start'])}{rounds(r)} | {loss_label(r)} "
                f"| {r['trainable']} | {r.get('train_text', 'wiki')} | {r['tokens_per_step'] // SEQ} x {lr_label(r)} | {c['tokens']:,} | {c['wiki_ppl']:.2f} | {c['lee_ppl']:.2f} | {fmt(c.get('wiki_top1_agree'), '{:.3f}')} | "
                f"{fmt(c.get('lee_top1_agree'), '{:.3f}')} | {c['wiki_ppl'] / dense['wiki_ppl']:.2f} | {c['lee_ppl'] / dense['lee_ppl']:.2f} | {c['train_seconds']:.0f} |"
                + ("" if r["complete"] or c is not r["checkpoints"][-1] else " (run incomplete)")
            )
    probes = load_store(RESULTS / "heal_probes.json")["rows"]
    probe_lines = ["| probe | start | loss | trainable | train text | batch | lr | schedule | T | hidden w | tokens | held-aside wiki ppl | held-aside wiki top-1 agree | held-aside MMLU-cal ppl |",
                   "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in probes:
        for c in r["checkpoints"]:
            probe_lines.append(f"| {r['name']} | {r['start']} k={r['k']}{rounds(r)} | {loss_label(r, hidden=False)} | {r['trainable']} | {r.get('train_text', 'wiki')} | {r['tokens_per_step'] // SEQ} | {lr_label(r)} | {r['schedule']} (warmup {r['warmup']}) | "
                               f"{fmt(r['temperature'], '{:g}')} | {fmt(r['hidden_weight'], '{:g}')} | {c['tokens']:,} | {c['heldaside_ppl']:.2f} | {fmt(c.get('heldaside_top1_agree'), '{:.3f}')} | "
                               f"{fmt(c.get('heldaside_mmlu_ppl'))} |")
    for d in {json.dumps(r["dense"], sort_keys=True): r["dense"] for r in probes}.values():
        probe_lines.append(f"| dense (reference) | - | - | - | - | - | - | - | - | - | 0 | {d['heldaside_ppl']:.2f} | 1.000 | {fmt(d.get('heldaside_mmlu_ppl'))} |")
    held = int(probes[0]["dense"]["heldaside_tokens"] + 1) // SEQ if probes else 0
    text = (RESULTS / "heal_notes.md").read_text() if (RESULTS / "heal_notes.md").exists() else ""
    (RESULTS / "heal.md").write_text(
        "# Healing SmolLM2-135M after depth compression\n\n"
        "Generated by `bench/heal.py render` from `bench/results/heal.json` (runs) and `heal_probes.json` (probes); commentary in "
        "`heal_notes.md`.\n\n" + text + "\n## Runs (held-out wiki articles and Lee, 8 x 512 tokens each, fp32 evaluation)\n\n" + "\n".join(lines)
        + f"\n\nToken checkpoints measured: {', '.join(f'{b:,}' for b in budgets)}.\n\n"
        f"## Probes (held-aside calibration-source text, the last {held} x 512 sequences; never the evaluation split)\n\n" + "\n".join(probe_lines) + "\n"
    )
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The runs with the recipe the tables quote (1 x 512 per step), one panel per k and text; stage-2 rows are in the
    # table. Perplexity is clipped at 4x dense so the healed end is readable (the starts can be far above).
    latest = [r for r in rows if r["tokens_per_step"] == SEQ] or rows
    ks = sorted({r["k"] for r in latest if r["k"]}, reverse=True)
    colors = {name: f"C{i}" for i, name in enumerate(order)}
    figure, axes = plt.subplots(len(ks), 2, figsize=(16, 5.2 * len(ks)), squeeze=False)
    for row_axes, k in zip(axes, ks):
        for axis, key in zip(row_axes, ("wiki_ppl", "lee_ppl")):
            for r in sorted((r for r in latest if r["k"] == k), key=lambda r: order.get(r["start"], 9)):
                points = [(c["tokens"], c[key]) for c in r["checkpoints"]]
                axis.plot([p[0] for p in points], [p[1] for p in points], "-" if r["loss"] == "kd" else "--", marker="o", markersize=3,
                          color=colors.get(r["start"]), label=f"{LABELS.get(r['start'], r['start'])}, {loss_label(r)}, lr {lr_label(r)} ({points[-1][1]:.2f})")
            axis.axhline(dense[key], color="black", lw=0.8, label=f"dense ({dense[key]:.2f})")
            axis.axhline(1.5 * dense[key], color="gray", lw=0.8, ls=":", label="1.5x dense")
            axis.set_ylim(0.9 * dense[key], 4 * dense[key])
            axis.set_xlabel("training tokens")
            axis.set_ylabel(f"held-out {key[:-4]} perplexity")
            axis.set_title(f"{k} of 30 layers removed: {key[:-4]}", fontsize=10)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=6, loc="upper right")
    figure.suptitle("SmolLM2-135M healed after depth compression, 1 x 512 tokens per step (clipped at 4x dense; all runs in heal.md)")
    figure.tight_layout()
    figure.savefig(RESULTS / "heal.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    starts = sub.add_parser("starts")
    starts.add_argument("--ks", nargs="+", type=int, default=[9, 6])
    starts.add_argument("--only", choices=["angular256", "ours256", "norefit256"], default=None, help="build only this start")
    run = sub.add_parser("run")
    run.add_argument("--start", required=True, choices=sorted(LABELS))
    run.add_argument("--k", type=int, default=9)
    run.add_argument("--loss", choices=["kd", "lm"], default="kd")
    run.add_argument("--trainable", default="all")
    run.add_argument("--tail-layers", type=int, default=3)
    run.add_argument("--lr", type=float, default=3e-4)
    run.add_argument("--merged-lr-scale", type=float, default=1.0, help="learning rate of the merged layers / the others (MKAModule merged_lr_scale)")
    run.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW's second-moment decay (default 0.999)")
    run.add_argument("--schedule", default="cosine")
    run.add_argument("--warmup", type=int, default=3)
    run.add_argument("--temperature", type=float, default=1.0)
    run.add_argument("--lm-weight", type=float, default=0.0)
    run.add_argument("--hidden-weight", type=float, default=0.0)
    run.add_argument("--precision", default="bf16-mixed")
    run.add_argument("--checkpoints", nargs="+", type=int, default=[0, 12, 25, 49], help="token checkpoints, in units of 2,048 tokens")
    run.add_argument("--batch-size", type=int, default=BATCH, help="sequences of 512 tokens per optimizer step (fewer: more steps for the same tokens)")
    run.add_argument("--heldaside", type=int, default=0, help="probe: evaluate on this many held-aside calibration-source sequences")
    run.add_argument("--rounds", type=int, default=1, help="> 1: merge the dense model in the fit, in this many rounds (ours / norefit)")
    run.add_argument("--merge-every", type=int, default=32, help="with --rounds: training steps between merge rounds")
    run.add_argument("--name", default=None)
    run.add_argument("--threads", type=int, default=0)
    run.add_argument("--train-text", choices=["wiki", "teacher", "mix"], default="wiki",
                     help="wiki calibration-source text after the calibration sequences, the dense model's own samples (bench/heal.py sample), or half of each, alternating")
    sample = sub.add_parser("sample")
    sample.add_argument("--tokens", type=int, default=49 * TOKENS_PER_STEP + 8 * SEQ)
    sample.add_argument("--batch-size", type=int, default=32)
    sub.add_parser("render")
    args = parser.parse_args()
    {"starts": cmd_starts, "run": cmd_run, "sample": cmd_sample, "render": cmd_render}[args.cmd](args)


if __name__ == "__main__":
    main()
