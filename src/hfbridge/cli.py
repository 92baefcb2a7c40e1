"""The ``hfbridge`` command line.

    hfbridge finetune [--model M] [--data train.jsonl] [--output DIR] ...   fine-tune (LoRA by default)
    hfbridge generate --model DIR --prompt "..." [--prompt ...]            generate with a saved model
    hfbridge demo-data --output DIR                                         write the bundled demo task
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from hfbridge.data.formats import FORMATS
from hfbridge.declarative import cli as declarative_cli
from hfbridge.models.loading import EMBEDDED_NAME
from hfbridge.parallel.launch import add_parallel_arguments, maybe_launch


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a causal LM (default: the embedded SmolLM2 on the demo task)")
    p.add_argument("--task", default="text-generation", choices=["text-generation", "image-text-to-text"],
                   help="text-generation (causal LMs, default) or image-text-to-text (vision-language models: chat "
                        "records with images, see docs/vlm.md)")
    p.add_argument("--model", default=None,
                   help=f"hub id, local folder, .gguf file or the embedded alias (default: {EMBEDDED_NAME}; for "
                        "image-text-to-text: tiny-random-vlm, a tiny model with random weights that shows the pipeline)")
    p.add_argument("--data", help="training data: .jsonl, .csv, .parquet or a datasets folder (default: demo task)")
    p.add_argument("--val-data", help="validation data (loss only)")
    p.add_argument("--test-data", help="held-out records scored by exact match before and after training")
    p.add_argument("--format", dest="data_format", default="auto", choices=["auto", *FORMATS])
    p.add_argument("--output", default="runs/finetune", help="output folder (refused if not empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate inputs to this many tokens (default: 512, or the model's context if shorter)")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size")
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--epochs", type=int, default=None, help="default 1 (6 for tiny-random-vlm)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--full", dest="lora", action="store_false", default=None,
                   help="full fine-tuning instead of LoRA (the default, except for tiny-random-vlm: full)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="all-linear", help="'all-linear' or comma-separated module names")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 weights via bitsandbytes (QLoRA with LoRA)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=100, help="held-out records to score")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per held-out answer")
    p.add_argument("--demo-train-size", type=int, default=400)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    speed = p.add_argument_group("speed (see docs/benchmarks.md)")
    speed.add_argument("--packing", choices=["auto", "on", "off"], default=None,
                       help="padding-free packing of each micro-batch (default auto: where the model keeps samples apart)")
    speed.add_argument("--pack-length", type=int, default=None, help="tokens per packed row (default: --max-length)")
    speed.add_argument("--no-chunked-loss", dest="chunked_loss", action="store_false", default=None,
                       help="compute the loss from the full tokens x vocabulary logits")
    speed.add_argument("--activation-checkpointing", nargs="?", const="full", default=None, metavar="full|selective|K",
                       help="recompute activations in backward: 'full' (the default when given: every layer, least "
                            "memory), 'selective' (every layer, recomputing only pointwise ops), or K (every K-th layer)")
    speed.add_argument("--compile", action="store_true", default=None, help="torch.compile the decoder layers")
    speed.add_argument("--liger", action="store_true", default=None,
                       help="Liger kernels on CUDA GPUs (needs liger-kernel; without a GPU: a warning, then PyTorch)")
    add_parallel_arguments(p)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate with a saved model (batched, left-padded)")
    p.add_argument("--model", required=True, help="a model folder, adapter folder, .gguf file or hub id")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--system", help="a system message (chat models)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo-data", help="write the bundled date-normalisation task as JSONL")
    p.add_argument("--output", required=True)
    p.add_argument("--train-size", type=int, default=400)
    p.add_argument("--test-size", type=int, default=100)
    p.add_argument("--format", dest="data_format", default="messages", choices=["messages", "prompt_completion"])
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfbridge", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_parser(sub)
    _generate_parser(sub)
    _demo_parser(sub)
    declarative_cli.add_parsers(sub)  # train | predict | evaluate | serve | llm-data (declarative configs)
    return parser


def cmd_finetune(args) -> int:
    from hfbridge.finetune import FinetuneConfig, run_finetune

    launched = maybe_launch(args, args._argv)  # --nproc-per-node outside torchrun: start torchrun instead
    if launched is not None:
        return launched
    options = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "func", "task", "_argv")}
    if isinstance(options.get("lora_targets"), str) and options["lora_targets"] != "all-linear":
        options["lora_targets"] = [t.strip() for t in options["lora_targets"].split(",") if t.strip()]
    options = {k: v for k, v in options.items() if v is not None}  # options left out take the job's defaults
    if args.task == "image-text-to-text":
        from hfbridge.vlm_finetune import run_vlm_finetune, vlm_config

        run_vlm_finetune(vlm_config(**options))
    else:
        run_finetune(FinetuneConfig(**options))
    return 0


def cmd_generate(args) -> int:
    from hfbridge.generation import generate
    from hfbridge.models.loading import load_for_inference

    model, tokenizer = load_for_inference(args.model, args.dtype, args.trust_remote_code)
    use_chat = not args.raw and bool(getattr(tokenizer, "chat_template", None))
    prompts = []
    for text in args.prompt:
        if use_chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            prompts.append([*messages, {"role": "user", "content": text}])
        else:
            prompts.append(text)
    kwargs = {"do_sample": True, "temperature": args.temperature} if args.sample else {}
    outputs = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       **kwargs)
    for text, out in zip(args.prompt, outputs):
        print(f"> {text}\n{out}\n")
    return 0


def cmd_demo_data(args) -> int:
    from hfbridge.data.demo import write_demo_data

    train, test = write_demo_data(args.output, args.train_size, args.test_size, args.seed, args.data_format)
    print(f"wrote {train} and {test}")
    return 0


COMMANDS = {"finetune": cmd_finetune, "generate": cmd_generate, "demo-data": cmd_demo_data,
            **declarative_cli.COMMANDS}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="[%(name)s] %(levelname)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for message in (".*LeafSpec.*", ".*is_gradient_checkpointing.*", ".*have no `val_dataloader`.*"):
        warnings.filterwarnings("ignore", message=message)  # known noise from the libraries underneath
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, KeyError) as e:
        if args.verbose:
            raise
        print(f"hfbridge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
