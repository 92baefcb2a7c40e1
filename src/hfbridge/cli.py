"""The ``hfbridge`` command line.

    hfbridge finetune [--config recipe.yaml] [--model M] [--data train.jsonl] [--output DIR] [--set k=v] ...
                                                                            fine-tune (LoRA by default)
    hfbridge generate --model DIR --prompt "..." [--prompt ...]            generate with a saved model
    hfbridge serve --model DIR [--port 8000] [--api-key KEY]                OpenAI-compatible HTTP server
    hfbridge demo-data --output DIR                                         write the bundled demo task
    hfbridge score --model RUN --data texts.jsonl                           rewards from a reward model
    hfbridge eval --model RUN --tasks hfbridge_dates                        lm-evaluation-harness tasks
    hfbridge export --model RUN --format gguf [--quant q8_0] --output F.gguf   GGUF for llama.cpp / Ollama
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from hfbridge import reward_scoring
from hfbridge.declarative import cli as declarative_cli
from hfbridge.export import cli as export_cli
from hfbridge.harness import cli as harness_cli
from hfbridge.parallel.launch import maybe_launch
from hfbridge.recipe.config import (
    RunConfig,
    add_config_arguments,
    config_yaml,
    flag_overrides,
    resolve_config,
)


def _finetune_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a model (default: the embedded SmolLM2 on the demo task)",
        description="Fine-tune a model with one run recipe: a YAML file (--config), flags, and --set overrides, in "
                    "that order of precedence. Every config key has a flag; --print-config shows the result.")
    add_config_arguments(p)


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


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over HTTP: OpenAI-compatible /v1/chat/completions and /v1/completions",
        description="Serve any model hfbridge loads (a finetune or declarative run folder, a model or adapter folder, "
                    "a .gguf file, the embedded alias) with OpenAI-compatible endpoints; concurrent requests are "
                    "decoded together. A declarative run folder (or --config) adds /predict. See docs/serving.md.")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="a run folder, model folder, adapter folder, .gguf file or the embedded alias")
    group.add_argument("--config", help="a declarative config whose base model is served as it is (with /predict)")
    p.add_argument("--model-id", help="the model name clients see (default: the folder or file name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only; any other needs a key)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--api-key", default=os.environ.get("HFBRIDGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $HFBRIDGE_API_KEY)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the GPU when there is one)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-new-tokens", type=_positive(int), default=512, help="the most tokens one choice may ask for")
    limits.add_argument("--max-n", type=_positive(int), default=8, help="the most choices (n) one request may ask for")
    limits.add_argument("--max-batch-size", type=_positive(int), default=16, help="rows decoded together")
    limits.add_argument("--batch-wait-ms", type=float, default=20.0,
                        help="a batch starts when no request came for this long (at most 5x after its first)")
    limits.add_argument("--no-continuous-batching", dest="continuous_batching", action="store_false",
                        help="requests that arrive while a batch decodes wait for the next batch instead of joining it")
    limits.add_argument("--max-queue", type=_positive(int), default=256,
                        help="requests waiting for the model; more get a 503")
    limits.add_argument("--workers", type=_positive(int), default=2, help="threads that encode prompts")
    limits.add_argument("--request-timeout", type=_positive(float), default=300.0,
                        help="seconds a request may take; past it a 504, and its generation stops")
    limits.add_argument("--read-timeout", type=_positive(float), default=30.0,
                        help="seconds a client has to send its request (headers and body)")
    limits.add_argument("--max-body-bytes", type=_positive(int), default=1 << 20)
    limits.add_argument("--max-records", type=_positive(int), default=256, help="records in one /predict request")
    limits.add_argument("--max-connections", type=_positive(int), default=512,
                        help="open connections; more are answered 503 and closed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfbridge", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_parser(sub)
    _generate_parser(sub)
    _demo_parser(sub)
    _serve_parser(sub)
    declarative_cli.add_parsers(sub)  # train | predict | evaluate | llm-data (declarative configs)
    harness_cli.add_parser(sub)  # eval (lm-evaluation-harness tasks)
    export_cli.add_parser(sub)  # export --format gguf
    reward_scoring.add_parser(sub)  # score (reward models)
    return parser


def finetune_config(args) -> RunConfig:
    """The run's config from ``--config``, the flags and ``--set`` (see :mod:`hfbridge.recipe.config`)."""
    from hfbridge.recipe.tasks import task_for

    def task_defaults(user: dict) -> dict:
        return task_for((user.get("method") or {}).get("task") or "text-generation").defaults(user)

    return resolve_config(args.config, flag_overrides(args), args.overrides, task_defaults)


def cmd_finetune(args) -> int:
    from hfbridge.recipe import pipeline

    cfg = finetune_config(args)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    launched = maybe_launch(cfg.parallel, args._argv)  # --nproc-per-node outside torchrun: start torchrun instead
    if launched is not None:
        return launched
    pipeline.run(cfg)
    return 0


def cmd_generate(args) -> int:
    from hfbridge.generation import generate
    from hfbridge.models.loading import load_for_inference

    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.sample and not args.temperature > 0:
        raise ValueError(f"--temperature must be above 0 to sample, got {args.temperature}")
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


def cmd_serve(args) -> int:
    from hfbridge.serving.app import ServeSettings
    from hfbridge.serving.server import serve

    settings = ServeSettings(
        api_key=args.api_key or None, max_new_tokens=args.max_new_tokens, max_n=args.max_n,
        max_batch_size=args.max_batch_size, batch_wait_ms=max(args.batch_wait_ms, 0.0), max_queue=args.max_queue,
        continuous_batching=args.continuous_batching,
        workers=args.workers, request_timeout=args.request_timeout, read_timeout=args.read_timeout,
        max_body_bytes=args.max_body_bytes, max_records=args.max_records, max_connections=args.max_connections)
    return serve(args.model, args.config, settings, host=args.host, port=args.port, device=args.device,
                 dtype=args.dtype, trust_remote_code=args.trust_remote_code, model_id=args.model_id)


COMMANDS = {"finetune": cmd_finetune, "generate": cmd_generate, "demo-data": cmd_demo_data, "serve": cmd_serve,
            "eval": harness_cli.cmd_eval, **declarative_cli.COMMANDS, **export_cli.COMMANDS,
            **reward_scoring.COMMANDS}


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
    except (OSError, ValueError, ImportError, KeyError) as e:  # config and checkpoint errors are ValueErrors
        if args.verbose:
            raise
        print(f"hfbridge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
