"""DPO training speed side by side: hfbridge's ``HFPreferenceModel`` against TRL's ``DPOTrainer``.

    .venv/bin/python bench/preference.py                 # embedded SmolLM2-135M-Instruct, LoRA r16, every system
    .venv/bin/python bench/preference.py --quick         # a smoke check: 2 optimizer steps, short data

Every system runs in its own process (so its peak memory is its own), one after another, on the same model, the
same preference pairs in the same order (conversations generated deterministically: the demo date task, the
chosen answer in ISO 8601, the rejected one in another format, each followed half the time by an explanation of
log-normal length), the same micro-batch (pairs), gradient accumulation, optimizer steps, learning rate and
schedule (AdamW, cosine to 0, no warmup, clipping at 1.0), sigmoid DPO with beta 0.1, LoRA r=16 on every linear
layer of the decoder, the reference being the model with the adapter disabled; float32 on CPU (bfloat16 weights
on a GPU). TRL runs at its defaults (activation checkpointing on; bf16 autocast off on CPU, as the others) and
at its fastest setting in TRL 1.16 (``trl-fast``: checkpointing off and ``precompute_ref_log_probs``; TRL 1.16's
``padding_free`` falls back to padding with a warning, and it always computes log-probabilities through its
fused, chunked LM head, so there is no ``use_logits_to_keep`` left to turn on).

Printed per system: completion (label) tokens per second over the timed optimizer steps (the first
``--warmup`` are not timed), the same per second of the process's CPU time, seconds spent before training
(``trl-fast``'s reference pass over the data set), peak memory (the process's peak RSS on CPU; CUDA max
allocated on a GPU), the first and the final optimizer step's loss; then hfbridge's ratios to each TRL run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  bench/speed.py: its child runner, recorder, data, model loading and timed fit are reused

BETA = 0.1
SEED = 0  # the data module's shuffling seed


@dataclass(frozen=True)
class System:
    kind: str  # hfbridge | trl
    checkpointing: bool | str | None = None  # None: the system's default (hfbridge: off; TRL: on); hfbridge: selective
    precompute: bool = False  # TRL: reference log-probabilities computed once before training
    reference: str = "auto"  # hfbridge: auto (the adapter disabled), precomputed
    packing: bool | str = "auto"  # hfbridge: auto packs the pairs padding-free when the model allows it
    note: str = ""


SYSTEMS = {
    "hfbridge": System("hfbridge", note="defaults: packing, adapter-disabled reference"),
    "hfbridge-padded": System("hfbridge", packing=False, note="packing off"),
    "hfbridge-precomputed": System("hfbridge", reference="precomputed", note="packing, precomputed reference"),
    "hfbridge-selective": System("hfbridge", checkpointing="selective",
                                 note="packing, selective activation checkpointing"),
    "hfbridge-precomputed-ckpt": System("hfbridge", reference="precomputed", checkpointing=True,
                                        note="packing, precomputed reference, activation checkpointing"),
    "hfbridge-precomputed-selective": System("hfbridge", reference="precomputed", checkpointing="selective",
                                             note="packing, precomputed reference, selective checkpointing"),
    "trl": System("trl", note="TRL DPOTrainer, its defaults (checkpointing on)"),
    "trl-no-ckpt": System("trl", checkpointing=False, note="TRL, checkpointing off"),
    "trl-fast": System("trl", checkpointing=False, precompute=True,
                       note="TRL, fastest: checkpointing off, precomputed reference"),
}
DEFAULT_SYSTEMS = "hfbridge,trl,trl-fast"


# ----------------------------------------------------------------------------------------------------- data
WORDS = ("the model learns to answer questions about dates numbers places and people in plain words while keeping "
         "each reply short clear and correct").split()


def preference_records(n: int, seed: int = 0, max_words: int = 80) -> list[dict]:
    """``n`` conversational pairs of the bundled preference task (:mod:`hfbridge.data.demo_preference`: the
    chosen answer in ISO 8601, the rejected one in another format), half of the answers followed by an
    explanation of log-normal length (median about 33 words, at most ``max_words``), as in real preference data."""
    from hfbridge.data.demo_preference import preference_records as demo_pairs

    rng = random.Random(f"preference-bench-{seed}")
    records = demo_pairs(n, seed, "train")
    for record in records:
        for key in ("chosen", "rejected"):
            if rng.random() < 0.5:
                message = record[key][0]
                extra = min(int(rng.lognormvariate(3.5, 0.9)), max_words)
                message["content"] += ". " + " ".join(rng.choice(WORDS) for _ in range(extra))
    return records


def records(args) -> list[dict]:
    """The pairs one run trains on, in the order hfbridge's data module draws them (epoch 0 of its seeded
    shuffle, as hfbridge.data.datamodule.EpochShuffleSampler draws it)."""
    return preference_records(args.steps * args.accumulate * args.batch_size, max_words=args.max_words)


def records_in_training_order(args) -> list[dict]:
    """:func:`records` as the data module orders them for the first epoch: TRL is given them in this order
    (and does not shuffle), so that every system trains on the same micro-batches."""
    from hfbridge.data.datamodule import EpochShuffleSampler

    pairs = records(args)
    return [pairs[i] for i in EpochShuffleSampler(len(pairs), SEED)]


def lora():
    from hfbridge.models.peft_adapters import LoRA

    return LoRA(r=16, alpha=32, dropout=0.0)


def load_base(args):
    """The model without its adapter (each system adds the same LoRA its own way)."""
    return speed.load_model(argparse.Namespace(**{**vars(args), "mode": "full"}), speed.model_dtype(args))


# ----------------------------------------------------------------------------------------------------- runners
def run_trl(args, system: System) -> dict:
    """TRL's DPOTrainer on the records, in order, with TRL's own tokenization and the LoRA as a ``peft_config``."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from hfbridge.models.loading import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_base(args)
    extra = {}
    if system.checkpointing is not None:
        extra["gradient_checkpointing"] = system.checkpointing
    config = DPOConfig(**{**speed._hf_common(args), "remove_unused_columns": True}, beta=BETA,
                       loss_type=["sigmoid"], max_length=args.max_length, precompute_ref_log_probs=system.precompute,
                       **extra)
    rec = speed.Recorder(args.device == "cuda")

    class InOrder(DPOTrainer):  # hfbridge's order (records_in_training_order): no shuffling
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    t0 = time.perf_counter()
    trainer = InOrder(model=model, args=config, train_dataset=Dataset.from_list(records_in_training_order(args)),
                      processing_class=tokenizer, peft_config=lora().peft_config(), callbacks=speed._hf_callbacks(rec))
    setup = time.perf_counter() - t0
    collate = trainer.data_collator

    def counting(batch):
        out = collate(batch)
        rec.micro_tokens.append(int(out["completion_mask"][:, 1:].sum()))  # the scored tokens
        return out

    trainer.data_collator = counting  # after __init__: the reference precompute is not counted
    trainer.train()
    rec.losses = speed._hf_losses(trainer)
    return {**rec.result(args), "setup_seconds": setup, "trainable": _trainable(trainer.model)}


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_hfbridge(args, system: System) -> dict:
    """HFPreferenceModel and PreferenceDataModule through a Lightning Trainer, as a user runs them (the data
    module's own tokenization, order, packing decision and step normalisation)."""
    import lightning.pytorch as pl
    import torch

    from hfbridge import OptimizerConfig
    from hfbridge.data.preference import PreferenceDataModule
    from hfbridge.models.loading import load_tokenizer
    from hfbridge.models.preference import HFPreferenceModel

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_base(args)
    rec = speed.Recorder(args.device == "cuda")
    t0 = time.perf_counter()  # as TRL's setup: adding the adapter, tokenizing (and the reference pass)
    module = HFPreferenceModel(
        model_name=model, tokenizer=tokenizer, model_transform=lora(), method="dpo", beta=BETA,
        reference=system.reference,
        optim=OptimizerConfig(lr=args.lr, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0, max_grad_norm=1.0),
        chunked_loss=True, activation_checkpointing=system.checkpointing or False,
    )
    dm = PreferenceDataModule(tokenizer, records(args), max_length=args.max_length, batch_size=args.batch_size,
                              seed=SEED, packing=system.packing)
    setup = {}

    class Timer(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            rec.start = rec.now()
            setup["seconds"] = time.perf_counter() - t0
            setup["packed"] = dm.use_packing()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rec.micro_tokens.append(speed.count_labels(batch))
            if (batch_idx + 1) % args.accumulate == 0:
                rec.step_end.append(rec.now())
                rec.losses.append(float(trainer.callback_metrics["train_loss"]))

    trainer = pl.Trainer(
        max_steps=args.steps, accumulate_grad_batches=args.accumulate, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision="32-true",
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    return {**rec.result(args), "setup_seconds": setup["seconds"], "packed": setup["packed"],
            "trainable": _trainable(module.model)}


RUNNERS = {"hfbridge": run_hfbridge, "trl": run_trl}


# ----------------------------------------------------------------------------------------------------- report


def run_child(name: str, args) -> dict:
    """One system in its own process (bench/speed.py's runner)."""
    return speed.run_child(name, args, script=__file__,
                           describe=lambda r: f"losses {r['losses'][0]:.4f} -> {r['loss']:.4f}")


def _speed(r: dict, key: str) -> float:
    return r["tokens"] / r[key]


def report(args, results: dict[str, dict]) -> list[str]:
    """The results as Markdown lines: every system, then hfbridge's ratios to each TRL run."""
    gpu = args.device == "cuda"
    mem_key, mem_name = ("cuda_max_alloc_mb", "CUDA max alloc MB") if gpu else ("peak_rss_mb", "peak RSS MB")
    threads = next((r["threads"] for r in results.values() if "threads" in r), "?")
    lines = [
        f"model={args.model} LoRA r16 device={args.device} steps={args.steps} (timed {args.steps - args.warmup}) "
        f"micro-batch={args.batch_size} pairs x accumulate {args.accumulate}, max_length={args.max_length}, "
        f"lr={args.lr}, beta={BETA}, torch threads={threads}",
        speed.versions(),
    ]
    header = ["system", "label tok/s", "label tok/CPU-s", "setup s", mem_name, "first-step loss", "final loss"]
    lines += [speed._fmt_row(header), speed._fmt_row(["---"] * len(header))]
    for name, r in results.items():
        label = f"{name} ({SYSTEMS[name].note})"
        if "error" in r:
            lines.append(speed._fmt_row([label, f"n/a: {r['error']}"] + [""] * (len(header) - 2)))
            continue
        lines.append(speed._fmt_row([
            label, f"{_speed(r, 'seconds'):.1f}", f"{_speed(r, 'cpu_seconds'):.1f}", f"{r['setup_seconds']:.1f}",
            f"{r[mem_key]:.0f}", f"{r['losses'][0]:.4f}", f"{r['loss']:.4f}"]))
    ours = {n: r for n, r in results.items() if SYSTEMS[n].kind == "hfbridge" and "error" not in r}
    theirs = {n: r for n, r in results.items() if SYSTEMS[n].kind == "trl" and "error" not in r}
    if ours and theirs:
        header = ["hfbridge / TRL", "speed (wall)", "speed (CPU)", "peak memory", "first-step loss", "final loss"]
        lines += ["", speed._fmt_row(header), speed._fmt_row(["---"] * len(header))]
        for a, ra in ours.items():
            for b, rb in theirs.items():
                lines.append(speed._fmt_row([
                    f"{a} / {b}", f"{_speed(ra, 'seconds') / _speed(rb, 'seconds'):.2f}",
                    f"{_speed(ra, 'cpu_seconds') / _speed(rb, 'cpu_seconds'):.2f}",
                    f"{ra[mem_key] / rb[mem_key]:.2f}", f"{ra['losses'][0] / rb['losses'][0]:.4f}",
                    f"{ra['loss'] / rb['loss']:.4f}"]))
    lines.append("label tok/s: completion tokens (chosen and rejected) trained per second over the timed steps; "
                 "setup s: seconds from building the trainer to its first step (TRL: tokenizing, and with "
                 "precompute_ref_log_probs the reference pass); speed ratios >1: hfbridge faster; memory <1: smaller")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--model-config", choices=sorted(speed.MODEL_CONFIGS), help="random init of this size instead")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps not timed")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per micro-batch")
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-words", type=int, default=80, help="longest explanation after an answer (words)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="a smoke check: 2 steps (1 timed), short answers")
    parser.add_argument("--json", help="also write every run's results here")
    parser.add_argument("--runner", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default="/tmp/hfbridge-preference-bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.accumulate, args.max_words = 2, 1, 2, 1, 20
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not 0 <= args.warmup < args.steps:
        sys.exit("--warmup must be at least 0 and below --steps")
    if args.runner:
        speed.child(args, SYSTEMS, RUNNERS)
        return
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        sys.exit(f"unknown systems: {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    results = {}
    for name in names:
        results[name] = run_child(name, args)
        if args.json:  # after every system, so a long run interrupted keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "versions": speed.versions(), "results": results}, f, indent=2)
    print("\n".join(report(args, results)))


if __name__ == "__main__":
    main()
