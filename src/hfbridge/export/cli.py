"""``hfbridge export``: a model as a GGUF file for llama.cpp and Ollama, checked by loading it back."""

from __future__ import annotations

import argparse

from hfbridge.export.gguf import QUANTS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a model as a GGUF file (llama.cpp, Ollama), checked by loading it back",
        description="Write a model (a finetune run folder, a model or adapter folder, the embedded alias) as one GGUF "
                    "file, then load it back with transformers' GGUF reader (and llama.cpp when llama-cpp-python is "
                    "installed) and compare tokenizer ids, greedy tokens and logits with the source model. The "
                    "file is kept only when that check passes. See docs/export.md.")
    p.add_argument("--model", required=True,
                   help="a finetune run folder, a model folder, an adapter folder (merged first) or the embedded alias")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="the output format (default: gguf)")
    p.add_argument("--quant", default="f16", choices=list(QUANTS),
                   help="f16 (matrices in half precision) or q8_0 (8-bit blocks); norms and biases stay f32")
    p.add_argument("--output", required=True, help="the file to write, ending in .gguf")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (only one hfbridge wrote)")
    p.add_argument("--prompt", action="append", dest="prompts",
                   help="a prompt the check decodes greedily (repeat; default: three built-in prompts)")
    p.add_argument("--check-tokens", type=_positive_int, default=16,
                   help="tokens the check decodes per prompt (default 16)")
    p.add_argument("--eval-data", help="also score exact match of the source and the GGUF file on these JSONL records "
                                       "(prompt/completion or chat; e.g. a run folder's data/test.jsonl)")
    p.add_argument("--eval-max-new-tokens", type=_positive_int, default=16)


def cmd_export(args) -> int:
    from hfbridge.export.gguf import export_gguf

    export_gguf(args.model, args.output, args.quant, overwrite=args.overwrite, prompts=args.prompts,
                max_new_tokens=args.check_tokens, eval_data=args.eval_data,
                eval_max_new_tokens=args.eval_max_new_tokens)
    return 0


COMMANDS = {"export": cmd_export}
