"""What the model modules ask of the layers above them, which they never import.

``hfbridge.models`` is the core: the parallel layer (:mod:`hfbridge.parallel`), the adapters face
(:mod:`hfbridge.adapters`) and the data layer (:mod:`hfbridge.data`) build on it. Where a module needs one of them,
it calls an implementation registered here, through the names and protocol defined here:

* ``parallel_plan``: a module's ``parallel`` argument (a :class:`hfbridge.parallel.ParallelConfig` or ``None``) ->
  its :class:`ParallelPlan`: the parallel layer receives the model and applies itself (tensor parallelism,
  activation checkpointing, ``torch.compile``, FSDP2, in torchtitan's order), also without a mesh;
* ``hf_api``: ``(native nn.Module, tokenizer)`` -> the model with the Hugging Face API
  (:func:`hfbridge.adapters.to_hf_api`), for ``HFAutoModelForCausalLM(model_name=<native module>)``;
* ``skipped_token_ids``: a processor or tokenizer -> the token ids never trained
  (:func:`hfbridge.data.image_text.skipped_token_ids`), for ``HFAutoModelForImageTextToText.extract_skipped_token_ids``.

:mod:`hfbridge` (the package's ``__init__``, which Python runs before any submodule) registers them, once, with
:func:`register`. Nothing registers anything as a side effect of importing those layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

CheckpointingMode = bool | str | int


@runtime_checkable
class ParallelPlan(Protocol):
    """How a module's model is made ready to train over a device mesh (or without one), and what that changes for
    training and saving. :class:`hfbridge.parallel.mesh_plan.MeshPlan` implements it; a module's ``parallel``
    argument may be any object with these methods."""

    def skeleton(self, module: Any, auto_class: Any = None, model_name: Any = None) -> nn.Module:
        """The module's model without its weights (meta device), to be parallelized, then filled."""

    def parallelize(self, model: nn.Module, mesh: Any = None, activation_checkpointing: CheckpointingMode = False,
                    compile: bool = False) -> nn.Module:
        """Tensor parallelism, activation checkpointing, ``torch.compile``, FSDP2, in that order (without a mesh:
        checkpointing and compile only); a skeleton is then filled with this rank's shards."""

    def data_parallel_mesh(self, mesh: Any) -> Any:
        """The ranks of ``mesh`` that see different data, as one group (their gradients are averaged)."""

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip by the global norm of gradients that may live on several meshes."""

    def gather(self, module: Any) -> nn.Module | None:
        """An unsharded copy of the module's model on rank 0, ``None`` on the others (every rank calls it)."""


@dataclass
class Hooks:
    """The registered implementations (``None`` until :func:`register`)."""

    parallel_plan: Callable[[Any], ParallelPlan] | None = None
    hf_api: Callable[[nn.Module, Any], nn.Module] | None = None
    skipped_token_ids: Callable[[Any], torch.Tensor] | None = None


_HOOKS = Hooks()


def register(**implementations: Callable) -> None:
    """Register implementations by name (the fields of :class:`Hooks`)."""
    names = {f.name for f in fields(Hooks)}
    for name, implementation in implementations.items():
        if name not in names:
            raise TypeError(f"unknown hook {name!r}; the hooks are {', '.join(sorted(names))}")
        setattr(_HOOKS, name, implementation)


def _registered(name: str) -> Callable:
    implementation = getattr(_HOOKS, name)
    if implementation is None:
        raise RuntimeError(f"no {name!r} implementation is registered (importing hfbridge registers them)")
    return implementation


def parallel_plan(parallel: Any) -> ParallelPlan:
    """``parallel`` itself when it is a :class:`ParallelPlan`, else the registered plan of that config."""
    if isinstance(parallel, ParallelPlan):
        return parallel
    return _registered("parallel_plan")(parallel)


def hf_api(model: nn.Module, tokenizer: Any = None) -> nn.Module:
    """A native module given the Hugging Face API (``generate``, ``save_pretrained``, ...)."""
    return _registered("hf_api")(model, tokenizer)


def skipped_token_ids(chat: Any) -> torch.Tensor:
    """The token ids of a processor (or tokenizer) that are never a training target."""
    return _registered("skipped_token_ids")(chat)


def check_checkpointing_mode(mode: CheckpointingMode | None) -> CheckpointingMode:
    """An ``activation_checkpointing`` mode normalised (``"full"`` -> True, ``1`` -> True, ``"2"`` -> 2), or a clear
    error: ``True``/``"full"`` every decoder layer, ``"selective"`` every layer recomputing only pointwise ops, an
    int ``k`` every k-th layer, ``False`` none."""
    if mode is None or mode is False or mode is True:
        return bool(mode)
    if isinstance(mode, str):
        text = mode.strip().lower()
        if text in ("full", "true", "on"):
            return True
        if text in ("false", "off", "none"):
            return False
        if text == "selective":
            return "selective"
        if text.isdigit():
            mode = int(text)
    if isinstance(mode, int) and mode >= 1:
        return True if mode == 1 else mode
    raise ValueError(
        f"activation_checkpointing={mode!r}: use True/'full' (every layer), 'selective' (every layer, recomputing "
        "only pointwise ops), an int k >= 1 (every k-th layer), or False"
    )
