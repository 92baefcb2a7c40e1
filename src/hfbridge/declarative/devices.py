"""Devices: which one, spreading a model over the GPUs by their free memory, and what quantization can run where.

The seed's system gave every GPU a hard-coded 13 GiB. Here each GPU's budget is its free memory (from
``torch.cuda.mem_get_info``) less a margin for activations and the KV cache, and accelerate places the layers.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Mapping, Sequence

import torch

log = logging.getLogger(__name__)

GIB = 1024**3
DEFAULT_MARGIN = 0.10  # of each GPU's free memory, kept for activations and the KV cache
DEFAULT_RESERVE = GIB // 2  # per GPU, for the CUDA context and fragmentation


class QuantizationError(ValueError):
    """Quantization the machine or device cannot do."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: the GPU when there is one, else the CPU. An unavailable device is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but this machine has no CUDA GPU; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} GPUs")
    return dev


def plan_max_memory(
    free_bytes: Sequence[int] | Mapping[int, int],
    margin: float = DEFAULT_MARGIN,
    reserve_bytes: int = DEFAULT_RESERVE,
    cpu_bytes: int | None = None,
) -> dict[int | str, int]:
    """accelerate's ``max_memory`` from each GPU's free memory: ``free * (1 - margin) - reserve``.

    A GPU left with nothing is skipped. ``cpu_bytes`` adds a CPU budget (offload); without it the model must fit
    on the GPUs, which :func:`dispatch_over_gpus` checks.
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    items = free_bytes.items() if isinstance(free_bytes, Mapping) else enumerate(free_bytes)
    plan: dict[int | str, int] = {}
    for index, free in items:
        usable = int(free * (1.0 - margin)) - reserve_bytes
        if usable > 0:
            plan[int(index)] = usable
        else:
            log.warning("GPU %s has %.2f GiB free: too little, not used", index, free / GIB)
    if not plan:
        raise RuntimeError("no GPU has enough free memory to hold part of the model")
    if cpu_bytes:
        plan["cpu"] = int(cpu_bytes)
    return plan


def gpu_free_memory() -> dict[int, int]:
    """Free bytes on each visible GPU."""
    return {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}


def _no_split_modules(model) -> list[str] | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(getattr(base, "_no_split_modules", None) or []) or None


def dispatch_over_gpus(model, max_memory: dict[int | str, int]):
    """Place ``model``'s layers over the GPUs of ``max_memory`` (accelerate) and return it."""
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=_no_split_modules(model))
    offloaded = sorted({str(d) for d in device_map.values() if str(d) in ("cpu", "disk")})
    if offloaded and "cpu" not in max_memory:
        raise RuntimeError(f"the model does not fit in the GPUs' free memory (plan: {max_memory})")
    placed = sorted({str(d) for d in device_map.values()})
    log.info("spreading the model over %s (budget per GPU: %s)", ", ".join(placed),
             ", ".join(f"{k}: {v / GIB:.1f} GiB" for k, v in max_memory.items()))
    return dispatch_model(model, device_map=device_map)


def check_quantization(bits: int, device: torch.device) -> None:
    """Raise :class:`QuantizationError` unless bitsandbytes can quantize to ``bits`` on ``device``.

    bitsandbytes runs on CUDA GPUs and (since its multi-backend releases) on the CPU. A tiny tensor is quantized
    on the device as a probe, so an old or CPU-less build is reported here rather than halfway through loading.
    """
    if bits not in (4, 8):
        raise QuantizationError(f"quantization.bits must be 4 or 8, got {bits}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(
            f"quantization.bits={bits} needs the bitsandbytes package: pip install 'hfbridge[quant]' "
            "(or pip install bitsandbytes), or remove the quantization section"
        )
    if device.type not in ("cuda", "cpu"):
        raise QuantizationError(
            f"quantization.bits={bits}: bitsandbytes quantizes on CUDA GPUs and on the CPU, not on {device.type!r}; "
            "use device cpu or cuda, or remove the quantization section"
        )
    try:
        import bitsandbytes.functional as bnbf

        if bits == 4:
            bnbf.quantize_4bit(torch.randn(64, 64, device=device))
        else:
            bnbf.int8_vectorwise_quant(torch.randn(4, 64, device=device, dtype=torch.float16))
    except Exception as e:  # bitsandbytes raises many types for a missing backend
        version = getattr(sys.modules.get("bitsandbytes"), "__version__", "?")
        raise QuantizationError(
            f"quantization.bits={bits}: bitsandbytes {version} cannot quantize on {device} ({type(e).__name__}: {e}); "
            "upgrade bitsandbytes, use a CUDA GPU, or remove the quantization section"
        ) from e
