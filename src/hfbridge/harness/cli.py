"""``hfbridge eval``: lm-evaluation-harness tasks on any model hfbridge loads.

    hfbridge eval --model RUN_OR_FOLDER --tasks hfbridge_dates,hfbridge_dates_mc [--limit N] [--num-fewshot K]
                  [--batch-size B] [--output results.json] [--device cuda] [--dtype auto]

Everything that can be wrong is checked before the model loads: lm-eval installed, the numbers, the output file,
the model's files, every task's name and data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hfbridge.harness.bundled import BUNDLED_TASKS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="score a model on lm-evaluation-harness tasks (bundled: hfbridge_dates, hfbridge_dates_mc)",
        description="Run lm-evaluation-harness tasks on any model hfbridge loads: a finetune run folder, a model or "
                    "adapter folder, a .gguf file, the embedded alias smollm2-135m-instruct, a hub id in the local "
                    "cache. Prints a table; --output writes the results as JSON. See docs/evaluation.md.")
    p.add_argument("--model", required=True,
                   help="a run folder, model folder, adapter folder, .gguf file or the embedded alias")
    p.add_argument("--tasks", required=True, metavar="T1,T2",
                   help=f"comma-separated task names: bundled ({', '.join(BUNDLED_TASKS)}) or any lm-eval task "
                        "whose data is in the local datasets cache")
    p.add_argument("--limit", type=int, default=None, help="score at most N documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--batch-size", type=int, default=16, help="requests run together")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="wrap each prompt in the model's chat template (the task description becomes the system "
                        "message)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a folder of more task YAMLs (repeatable)")
    p.add_argument("--output", default=None, help="write the results as JSON to this new file (never replaced)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the GPU when there is one)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPUs that have it), float32, "
                                                   "bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true")


def check_model(name: str, trust_remote_code: bool = False) -> str:
    """The name to load (a run folder's model/ or adapter/), its files checked to exist: a ModelNotFoundError
    (an OSError) naming what was tried, before any weights are read. A .gguf file is converted later."""
    from hfbridge.models import loading

    path = Path(name).expanduser()
    if path.exists():
        path = loading.run_folder_model(path)
        if loading.is_adapter_dir(path):
            from peft import PeftConfig

            base = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
            if Path(base).suffix.lower() != ".gguf":
                loading.resolve_model_path(base, trust_remote_code)
            return str(path)
        if path.suffix.lower() != ".gguf":
            loading.resolve_model_path(path, trust_remote_code)
        return str(path)
    if path.suffix.lower() == ".gguf":
        raise loading.ModelNotFoundError(f"GGUF file not found: {path}")
    loading.resolve_model_path(name, trust_remote_code)  # a folder that is not there, or a hub id not cached
    return name


def load_model(source: str, dtype, trust_remote_code: bool = False):
    """``(model, tokenizer)`` through :func:`hfbridge.models.loading.load_for_inference`."""
    from hfbridge.models import loading

    return loading.load_for_inference(source, dtype, trust_remote_code)


def _device(device: str | None):
    import torch

    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return device


def cmd_eval(args: argparse.Namespace) -> int:
    from hfbridge.console import say
    from hfbridge.harness import lm_eval_runner as runner
    from hfbridge.models import loading

    # 1. Cheap checks, in the order a user fixes them.
    runner.require_lm_eval()
    runner.check_limit(args.limit)
    runner.check_num_fewshot(args.num_fewshot)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = _device(args.device)
    dtype = loading.resolve_dtype(args.dtype, device)
    if args.output:
        runner.check_output_file(args.output)
    source = check_model(args.model, args.trust_remote_code)
    tasks = runner.prepare_tasks(args.tasks, args.include_path)

    # 2. Load, score, report.
    model, tokenizer = load_model(source, dtype, args.trust_remote_code)
    model.to(device)
    say(f"scoring {args.model} on {', '.join(tasks.names)} ({device}, {str(dtype).removeprefix('torch.')}, "
        f"batch {args.batch_size}{f', limit {args.limit}' if args.limit else ''})")
    results = runner.evaluate(model, tokenizer, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                              batch_size=args.batch_size, apply_chat_template=args.apply_chat_template,
                              verbose=getattr(args, "verbose", False))
    print(runner.table(results))
    if args.output:
        settings = {"model": str(args.model), "loaded_from": source, "tasks": tasks.names, "limit": args.limit,
                    "num_fewshot": args.num_fewshot, "batch_size": args.batch_size,
                    "apply_chat_template": args.apply_chat_template, "device": str(device),
                    "dtype": str(dtype).removeprefix("torch.")}
        path = runner.write_results(args.output, runner.report(results, **settings))
        say(f"wrote {path}")
    return 0
