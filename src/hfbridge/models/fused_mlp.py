"""The gated MLP's ``silu(gate) * up`` as one autograd function that keeps two tensors for backward, not three.

A Llama-family MLP computes ``down(silu(gate(x)) * up(x))``. Autograd keeps ``gate(x)`` for the SiLU's backward,
and ``silu(gate(x))`` and ``up(x)`` for the product's: three ``tokens x intermediate`` tensors per layer, the largest
activations a layer keeps. :class:`SwiGLU` keeps ``gate(x)`` and ``up(x)`` and recomputes the SiLU in backward (one
pointwise pass), as Liger's SwiGLU kernel does on a GPU; its gradients are computed by the same ATen operations
in the same order as autograd's (``silu_backward`` of ``grad * up``, ``grad * silu(gate)``), so they are the same
numbers. :func:`fuse_gated_mlps` gives every such MLP of a model this forward (Liger's kernels replace it on a GPU).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` (not the SiLU's output) for backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


def _silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def gated_mlp(module: nn.Module) -> bool:
    """A Llama-family gated MLP: ``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``, and no other
    submodule that its forward could use."""
    names = {name for name, _ in module.named_children()}
    return (type(module).__name__.endswith("MLP") and names == {"gate_proj", "up_proj", "down_proj", "act_fn"}
            and _silu(module.act_fn))


def _forward(self, x):
    return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_gated_mlps(model: nn.Module) -> int:
    """Give every gated MLP of ``model`` the :class:`SwiGLU` forward; returns how many."""
    count = 0
    for module in model.modules():
        if gated_mlp(module) and "forward" not in vars(module):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
