"""A Hugging Face causal LM (a model folder, a ``finetune`` run folder, a peft adapter folder, the embedded alias)
written as one GGUF file for llama.cpp and Ollama, then checked by loading it back.

What is written follows llama.cpp's ``convert_hf_to_gguf.py`` for these architectures:

* the hyper-parameters under ``{arch}.*`` (context, embedding and feed-forward lengths, block and head counts,
  rope base and dimension, RMS-norm epsilon, vocabulary size) and ``general.file_type``;
* the weights under llama.cpp's tensor names (``gguf.get_tensor_name_map``): 1-D tensors (norms, biases) in F32,
  matrices in F16 or Q8_0 (a matrix whose rows are not a whole number of 32-value blocks stays F16); the query and
  key projections of ``llama`` models permuted to llama.cpp's rotary layout (transformers' GGUF reader permutes
  them back); no ``output.weight`` when the embeddings are tied;
* the tokenizer (``tokenizer.ggml.*``: a byte-level BPE as ``gpt2`` with tokens, token types, merges and the
  pre-tokenizer's name, special token ids and ``add_bos``/``add_eos`` flags) and the chat template.

Every export is checked before it counts: the file is loaded back with transformers' GGUF reader, its tokenizer
must give the source tokenizer's ids (chat template rendering included), greedy decoding must give the source
model's tokens and the logits must stay within the quantization's tolerance (:data:`TOLERANCES`); with
``llama_cpp`` importable, llama.cpp must decode the source's tokens too. The file is written under a temporary
name beside the output and renamed into place only when the check passes; otherwise it is removed and the
error raised. A file at the output path is replaced only with ``overwrite`` and only when hfbridge wrote it (its
``hfbridge.writer`` metadata key).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hfbridge.console import say

log = logging.getLogger(__name__)

# model_type in config.json -> the GGUF architecture llama.cpp writes it as (Mistral is Llama in llama.cpp)
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
QUANTS = ("f16", "q8_0")
# The largest |logit difference| allowed between the source model and the file read back by transformers, over
# every position of the prompts and their greedy continuations. Measured (docs/export.md) on the fine-tuned
# SmolLM2-135M demo model, whose logits reach about 40: 0.050 for f16 and 2.37 for q8_0 (30 layers of 8-bit
# weights); on the tiny test models 0.004 and 0.13. The bounds leave about 5x and 1.7x room over those; a wrong
# tensor layout moves the logits by far more (see docs/export.md).
TOLERANCES = {"f16": 0.25, "q8_0": 4.0}
WRITER_KEY = "hfbridge.writer"
_TMP = ".tmp-"
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Rewrite the date in ISO 8601 format: March 3rd, 2021",
    "Write one sentence about the sea.",
)
SAMPLE_TEXTS = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Dates: 1967-08-25, 15-Nov-1967, 3.14159 and 1000000.",
    "Ünïcödé: café, naïve, 東京, emoji 🚀",
)


@dataclass
class CheckResult:
    """What the round-trip check measured for one backend (transformers' GGUF reader, or llama.cpp)."""

    backend: str
    max_abs_logit_diff: float | None
    tolerance: float | None
    same_tokens: list[bool]
    near_ties: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        logits_ok = None in (self.max_abs_logit_diff, self.tolerance) or self.max_abs_logit_diff <= self.tolerance
        return logits_ok and all(self.same_tokens)


@dataclass
class ExportResult:
    path: Path
    quant: str
    architecture: str
    size_bytes: int
    checks: list[CheckResult]
    tokenizer_texts_checked: int
    exact_match: dict | None = None  # {"source": accuracy, "gguf": accuracy, "records": n} with eval_data


# ------------------------------------------------------------------------------------------- what to export
@dataclass
class _Source:
    name: str  # what load_for_inference takes
    label: str  # the name written as general.name
    config: dict  # the (base) model's config.json
    tokenizer_dir: Path


def _resolve_source(model: str | os.PathLike) -> _Source:
    """The model's config and tokenizer folder, read without loading any weights."""
    from hfbridge.models.loading import is_adapter_dir, resolve_model_path, run_folder_model

    given = Path(str(model)).expanduser()
    path = run_folder_model(given)
    label = (given.name if path != given else path.name) or str(model)
    if is_adapter_dir(path):
        from peft import PeftConfig

        base = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
        base_dir = resolve_model_path(base)
        tokenizer_dir = path if (path / "tokenizer_config.json").exists() else base_dir
        config_dir = base_dir
    else:
        config_dir = resolve_model_path(str(path) if path.exists() else str(model))
        tokenizer_dir = config_dir
        if not path.exists():
            label = str(model).rstrip("/").split("/")[-1]
    config = json.loads((config_dir / "config.json").read_text())
    return _Source(str(path) if path.exists() else str(model), label, config, Path(tokenizer_dir))


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def check_config(config: dict, where: str = "the model") -> str:
    """The GGUF architecture of a model config, or a ValueError naming what is not supported."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where} is a {model_type!r} model ({', '.join(config.get('architectures') or [])}); "
                         f"GGUF export supports the model types {', '.join(SUPPORTED_MODEL_TYPES)}")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ValueError(f"{where} uses rope scaling {rope_type!r}: not supported by this export (transformers' "
                         "GGUF reader ignores rope scaling, so the round-trip check could not verify it)")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where} uses hidden_act={config.get('hidden_act')!r}; GGUF {model_type} needs 'silu'")
    if model_type in ("llama", "mistral") and (config.get("attention_bias") or config.get("mlp_bias")):
        raise ValueError(f"{where} has attention or MLP biases, which transformers' GGUF reader of {model_type} "
                         "models does not restore; not supported")
    if model_type == "qwen3" and config.get("attention_bias"):
        raise ValueError(f"{where} has attention biases, which transformers' GGUF reader of qwen3 does not "
                         "restore; not supported")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if model_type == "qwen3" and head_dim != 128:
        # transformers' GGUF reader takes no head width for qwen3 and falls back to Qwen3Config's 128
        raise ValueError(f"{where} is a qwen3 model with head_dim={head_dim}; transformers' GGUF reader assumes "
                         "128 for qwen3 (as every released Qwen3 has), so the file could not be checked")
    return SUPPORTED_MODEL_TYPES[model_type]


# -------------------------------------------------------------------------------------------- the output file
def is_hfbridge_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GGUF file hfbridge wrote (it carries the ``hfbridge.writer`` metadata key)."""
    from gguf import GGUFReader

    try:
        return WRITER_KEY in GGUFReader(str(path)).fields
    except Exception:  # not a GGUF file, or a broken one: not ours
        return False


def check_output_file(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output path that is a folder, lacks the ``.gguf`` suffix, or is an existing file unless
    ``overwrite`` — and even then a file hfbridge did not write."""
    from hfbridge.io import _protected

    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"--output {path}: a GGUF file name must end in .gguf")
    if path.is_dir():
        raise OSError(f"--output {path} is a folder; give a file name ending in .gguf")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output file {path} exists; choose another or pass --overwrite")
        if path.is_symlink() or not path.is_file():
            raise FileExistsError(f"refusing to replace {path}: it is not a regular file")
        reason = _protected(path)
        if reason:
            raise FileExistsError(f"refusing to replace {path}: {reason}")
        if not is_hfbridge_gguf(path):
            raise FileExistsError(f"refusing to replace {path}: it was not written by hfbridge (no {WRITER_KEY} "
                                  "key in its GGUF metadata); remove it yourself or choose another name")
    if not path.parent.is_dir():
        if path.parent.exists():
            raise OSError(f"--output {path}: {path.parent} is not a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _clean_stale_tmp(path: Path) -> None:
    """Remove temporary files a killed export left beside ``path`` (``.NAME.tmp-PID-*`` with PID gone)."""
    from hfbridge.io import _pid_alive

    for leftover in path.parent.glob(f".{path.name}{_TMP}*"):
        pid = leftover.name.rpartition(_TMP)[2].partition("-")[0]
        if not (leftover.is_file() and pid.isdigit()) or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        with open(leftover, "rb") as f:
            if f.read(4) not in (b"GGUF", b""):
                continue  # not what an export writes: left alone
        leftover.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- the writing
def permute_rotary(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: Hugging Face's rotate-half layout of a q/k projection to GGML's
    interleaved one (transformers' GGUF reader applies the inverse)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_data(name: str, data: np.ndarray, quant: str):
    """``(array, GGMLQuantizationType)`` as llama.cpp stores it for this file type."""
    from gguf import GGMLQuantizationType, QuantError, quants

    if data.ndim <= 1:
        return data.astype(np.float32), GGMLQuantizationType.F32
    if quant == "q8_0":
        try:
            return quants.quantize(data.astype(np.float32), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
        except QuantError as e:
            log.info("%s: %s; stored as F16", name, e)
    return data.astype(np.float16), GGMLQuantizationType.F16


def _add_tensors(writer, model, arch_name: str, config: dict, quant: str) -> None:
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    tied = bool(config.get("tie_word_embeddings"))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name} of a {arch_name} model")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch_name == "llama" and hf_name.endswith("q_proj.weight"):
            data = permute_rotary(data, n_head, n_head)
        elif arch_name == "llama" and hf_name.endswith("k_proj.weight"):
            data = permute_rotary(data, n_head, n_kv)
        array, qtype = _tensor_data(new_name, data, quant)
        writer.add_tensor(new_name, array, raw_dtype=qtype)


def _add_hparams(writer, config: dict, arch_name: str, quant: str, label: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(label)
    writer.add_string(WRITER_KEY, "hfbridge")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if config.get("head_dim") is not None and head_dim != config["hidden_size"] // heads or arch_name == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# The pre-tokenizers llama.cpp knows by name, recognised from tokenizer.json's structure.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) of a byte-level BPE tokenizer's pre-tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
        if regex == _QWEN2_REGEX:
            return "qwen2"
    raise ValueError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one this export knows "
                     "(GPT-2 byte-level, SmolLM digits + byte-level, Llama 3 or Qwen2 split + byte-level)")


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def check_tokenizer_kind(tokenizer, tokenizer_dir: Path, vocab_size: int) -> tuple[str, dict]:
    """``(llama.cpp pre-tokenizer name, BPE model spec)`` of a byte-level BPE tokenizer; a ValueError for any
    other kind (SentencePiece-style byte-fallback BPE, Unigram, WordPiece, slow tokenizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the tokenizer in {tokenizer_dir} is not a fast (tokenizers) tokenizer; GGUF export needs "
                         "one")
    spec = json.loads(backend.to_str())  # the pipeline transformers runs, which may differ from tokenizer.json
    model_spec = spec.get("model") or {}
    if model_spec.get("type") != "BPE" or model_spec.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte fallback)" if model_spec.get("byte_fallback") else model_spec.get("type")
        raise ValueError(f"the tokenizer in {tokenizer_dir} is a {kind} tokenizer; GGUF export writes byte-level "
                         "BPE (GPT-2 style) tokenizers only, not SentencePiece ('llama') vocabularies")
    pre = _pre_tokenizer_name(spec)
    if max(tokenizer.get_vocab().values()) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(tokenizer.get_vocab().values())} but the model's "
                         f"vocab_size is {vocab_size}")
    if not model_spec.get("merges"):
        raise ValueError(f"the tokenizer in {tokenizer_dir} has no merges")
    return pre, model_spec


def _add_tokenizer(writer, tokenizer, tokenizer_dir: Path, vocab_size: int) -> None:
    """``tokenizer.ggml.*`` and the chat template, as llama.cpp's ``get_vocab_base`` and ``SpecialVocab`` write
    them for a byte-level BPE tokenizer."""
    import gguf

    pre, model_spec = check_tokenizer_kind(tokenizer, tokenizer_dir, vocab_size)
    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            special = added[i].special or _looks_special(reverse[i])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(part.replace(" ", chr(ord(" ") + 256)) for part in m)
              for m in model_spec["merges"]]  # pairs with spaces spelled as llama.cpp's SpecialVocab does
    writer.add_token_merges(merges)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=False, n_vocab=vocab_size)
    special.add_special_token.setdefault("bos", False)  # llama.cpp's default for gpt2 vocabularies
    if getattr(tokenizer, "chat_template", None) and special.chat_template is None:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def _write(path: Path, model, tokenizer, source: _Source, arch_name: str, quant: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch_name)
    try:
        _add_hparams(writer, source.config, arch_name, quant, source.label)
        _add_tokenizer(writer, tokenizer, source.tokenizer_dir, source.config["vocab_size"])
        _add_tensors(writer, model, arch_name, source.config, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------- the check
def _chat_prompts(tokenizer, prompts: Sequence[str]) -> list:
    if getattr(tokenizer, "chat_template", None):
        return [[{"role": "user", "content": p}] for p in prompts]
    return list(prompts)


def check_tokenizer(source, loaded, prompts: Sequence) -> int:
    """Raise unless the GGUF tokenizer gives the source's ids and special tokens; the number of texts checked."""
    texts = list(SAMPLE_TEXTS) + [p for p in prompts if isinstance(p, str)]
    if getattr(source, "chat_template", None):
        conversation = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Date of 3/4/21?"}]
        for messages in [conversation, *[p for p in prompts if not isinstance(p, str)]]:
            rendered = source.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            other = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if rendered != other:
                raise ValueError(f"the GGUF chat template renders {other!r}, the source {rendered!r}")
            texts.append(rendered)
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(source, name) is not None and getattr(source, name) != getattr(loaded, name):
            raise ValueError(f"the GGUF tokenizer's {name} is {getattr(loaded, name)}, the source's "
                             f"{getattr(source, name)}")
    for text in texts:
        for special in (True, False):
            want = source(text, add_special_tokens=special)["input_ids"]
            got = loaded(text, add_special_tokens=special)["input_ids"]
            if want != got:
                raise ValueError(f"the GGUF tokenizer encodes {text!r} as {got}, the source tokenizer as {want}")
    return len(texts)


@torch.no_grad()
def _sequence_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


def _compare_tokens(backend: str, source_runs, candidate_tokens, candidate_logits, tolerance) -> CheckResult:
    """Tokens must equal the source's; a first difference is let through only as a near tie: where the source's
    own margin between the two tokens is within twice the logit difference measured there, and that difference
    is within the tolerance (a difference of ``d`` in every logit can flip a margin of up to ``2 d``)."""
    diffs, same, ties = [], [], []
    for (prompt_ids, tokens, logits), other, other_logits in zip(source_runs, candidate_tokens, candidate_logits):
        if other_logits is not None:
            n = min(len(logits), len(other_logits))
            diffs.append(float((logits[:n] - other_logits[:n]).abs().max()))
        if other == tokens:
            same.append(True)
            continue
        j = next((k for k, (a, b) in enumerate(zip(tokens, other)) if a != b), min(len(tokens), len(other)))
        ok = False
        if j < min(len(tokens), len(other)) and other_logits is not None:
            row = len(prompt_ids) - 1 + j
            margin = float(logits[row, tokens[j]] - logits[row, other[j]])
            local = float((logits[row] - other_logits[row]).abs().max())
            ok = margin <= 2 * local and (tolerance is None or local <= tolerance)
            if ok:
                ties.append(f"token {j}: source {tokens[j]} vs {other[j]}, margin {margin:.4f} <= 2 x {local:.4f}")
        same.append(ok)
    return CheckResult(backend, max(diffs) if diffs else None, tolerance, same, ties)


def _source_runs(model, tokenizer, prompts, max_new_tokens: int):
    from hfbridge.generation import generate_ids, prompt_ids

    generated = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts))
    runs = []
    for prompt, tokens in zip(prompts, generated):
        ids = prompt_ids(tokenizer, prompt)
        runs.append((ids, tokens, _sequence_logits(model, ids + tokens)))
    return runs


def _check_transformers(path: Path, source_runs, source_tokenizer, prompts, quant: str, max_new_tokens: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfbridge.generation import generate_ids

    loaded_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = check_tokenizer(source_tokenizer, loaded_tokenizer, prompts)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    loaded.eval()
    tokens = generate_ids(loaded, source_tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts))
    logits = [_sequence_logits(loaded, ids + src) for ids, src, _ in source_runs]
    return _compare_tokens("transformers", source_runs, tokens, logits, TOLERANCES[quant]), loaded, \
        loaded_tokenizer, texts


def _check_llama_cpp(path: Path, source_runs, stops: set[int], max_new_tokens: int) -> CheckResult:
    """Greedy decoding in llama.cpp (``llama-cpp-python``) from the source's prompt ids."""
    from llama_cpp import Llama

    context = max(len(ids) + max_new_tokens for ids, _, _ in source_runs) + 8
    context = max(256, -(-context // 256) * 256)
    llm = Llama(model_path=str(path), n_ctx=context, n_batch=context, logits_all=True, verbose=False, seed=0)
    try:
        return _decode_llama_cpp(llm, source_runs, stops, max_new_tokens)
    finally:
        llm.close()


def _decode_llama_cpp(llm, source_runs, stops: set[int], max_new_tokens: int) -> CheckResult:
    tokens, logits = [], []
    for ids, source_tokens, _ in source_runs:
        llm.reset()
        llm.eval(ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if nxt in stops:
                break
            out.append(nxt)
            llm.eval([nxt])
        tokens.append(out)
        llm.reset()  # the logits along the source's own sequence, for the near-tie rule
        llm.eval(ids + source_tokens)
        logits.append(torch.from_numpy(np.array(llm.scores[: llm.n_tokens], dtype=np.float32)))
    return _compare_tokens("llama.cpp", source_runs, tokens, logits, None)


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _describe(result: CheckResult, quant: str) -> str:
    diff = ("" if result.max_abs_logit_diff is None else
            f"max |logit diff| {result.max_abs_logit_diff:.5f}"
            + (f" (tolerance {result.tolerance} for {quant}), " if result.tolerance is not None else ", "))
    ties = f" ({len(result.near_ties)} near ties: {'; '.join(result.near_ties)})" if result.near_ties else ""
    return (f"{result.backend}: {diff}greedy tokens identical on {sum(result.same_tokens)}/"
            f"{len(result.same_tokens)} prompts{ties}")


# ------------------------------------------------------------------------------------------------ the command
def _exact_match(model, tokenizer, data_path, max_new_tokens: int, batch_size: int) -> tuple[float, int]:
    from hfbridge.data.datamodule import load_records
    from hfbridge.data.formats import prompt_and_reference
    from hfbridge.evaluation import exact_match
    from hfbridge.generation import generate

    records, fmt = load_records(data_path)
    pairs = [prompt_and_reference(r, fmt) for r in records]
    prompts = [p for p, _ in pairs]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return exact_match(answers, [r for _, r in pairs], prompts).accuracy, len(pairs)


def export_gguf(model: str | os.PathLike, output: str | os.PathLike, quant: str = "f16", *, overwrite: bool = False,
                prompts: Sequence[str] | None = None, max_new_tokens: int = 16, llama_cpp: bool | None = None,
                eval_data: str | os.PathLike | None = None, eval_max_new_tokens: int = 16,
                report: Callable[[str], None] = say) -> ExportResult:
    """Write ``model`` as a GGUF file at ``output`` and check it (see the module docstring).

    ``prompts``: the texts greedy decoding is compared on (default :data:`DEFAULT_PROMPTS`, as chat turns when the
    tokenizer has a chat template); ``llama_cpp``: also decode in llama.cpp (default: when ``llama_cpp`` is
    importable); ``eval_data``: a JSONL file of prompt/completion or chat records whose exact match is scored
    for the source model and the file loaded back.
    """
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    output = check_output_file(output, overwrite)
    if eval_data is not None and not Path(eval_data).is_file():
        raise FileNotFoundError(f"evaluation data not found: {eval_data}")
    if llama_cpp and not llama_cpp_available():
        raise ImportError("the llama.cpp check needs llama-cpp-python (pip install llama-cpp-python)")
    use_llama_cpp = llama_cpp_available() if llama_cpp is None else llama_cpp
    source = _resolve_source(model)
    arch_name = check_config(source.config, f"model {model}")
    from transformers import AutoTokenizer

    from hfbridge.generation import stop_ids
    from hfbridge.models.loading import load_for_inference

    tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    check_tokenizer_kind(tokenizer, source.tokenizer_dir, source.config["vocab_size"])  # before any weights
    report(f"loading {source.name} ({source.config['model_type']}, GGUF architecture {arch_name})")
    loaded_model, _ = load_for_inference(source.name, dtype=torch.float32)
    if hasattr(loaded_model, "merge_and_unload"):
        loaded_model = loaded_model.merge_and_unload()  # an adapter: merged into its base
    loaded_model.eval()
    check_prompts = _chat_prompts(tokenizer, prompts or DEFAULT_PROMPTS)

    _clean_stale_tmp(output)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}{_TMP}{os.getpid()}-", suffix=".gguf", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write(tmp, loaded_model, tokenizer, source, arch_name, quant)
        size = tmp.stat().st_size
        report(f"wrote {size / 2**20:.1f} MiB ({quant}); checking it by loading it back")
        runs = _source_runs(loaded_model, tokenizer, check_prompts, max_new_tokens)
        result, gguf_model, gguf_tokenizer, texts = _check_transformers(
            tmp, runs, tokenizer, check_prompts, quant, max_new_tokens)
        report(f"tokenizer: same ids on {texts} texts (chat template rendering included)"
               if getattr(tokenizer, "chat_template", None) else f"tokenizer: same ids on {texts} texts")
        report(_describe(result, quant))
        checks = [result]
        if use_llama_cpp:
            cpp = _check_llama_cpp(tmp, runs, stop_ids(tokenizer, loaded_model), max_new_tokens)
            report(_describe(cpp, quant))
            checks.append(cpp)
        failed = [c for c in checks if not c.passed]
        if failed:
            raise ValueError("the GGUF round-trip check failed: " + "; ".join(_describe(c, quant) for c in failed))
        scores = None
        if eval_data is not None:
            src_acc, n = _exact_match(loaded_model, tokenizer, eval_data, eval_max_new_tokens, 16)
            gguf_acc, _ = _exact_match(gguf_model, gguf_tokenizer, eval_data, eval_max_new_tokens, 16)
            scores = {"source": src_acc, "gguf": gguf_acc, "records": n}
            report(f"exact match on {n} records of {eval_data}: source {src_acc:.1%}, GGUF {gguf_acc:.1%}")
        os.replace(tmp, output)
        dir_fd = os.open(output.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)
    report(f"exported {output} ({size / 2**20:.1f} MiB, {arch_name}, {quant})")
    return ExportResult(output, quant, arch_name, size, checks, texts, scores)
