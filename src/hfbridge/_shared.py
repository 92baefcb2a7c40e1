"""Small pieces shared by hfbridge's faces (PyTorch, JAX, declarative) that import nothing heavy."""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Iterator, Sequence


def lazy_exports(module: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for a package that imports each name of ``exports`` (name -> submodule) on first
    use, so importing the package stays cheap."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            vars(importlib.import_module(module))[name] = value
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(importlib.import_module(module))) | set(exports))

    return __getattr__, __dir__


def resolve_axis_dims(axis_dims: Sequence[int], total: int, size_name: str = "world size",
                      unit: str = "processes") -> tuple[int, ...]:
    """Replace the one ``-1`` in ``axis_dims`` so the product is ``total`` (the world size of a torch mesh, the
    device count of a JAX one); raise, naming ``size_name``, when that is impossible."""
    dims = tuple(int(d) for d in axis_dims)
    if any(d == 0 or d < -1 for d in dims):
        raise ValueError(f"sharding_axis_dims {dims}: each entry must be a positive int or -1")
    free = [i for i, d in enumerate(dims) if d == -1]
    if len(free) > 1:
        raise ValueError(f"sharding_axis_dims {dims}: at most one -1 is allowed, found {len(free)}")
    known = math.prod(d for d in dims if d != -1)
    if free:
        if total % known:
            raise ValueError(
                f"sharding_axis_dims {dims}: the fixed sizes multiply to {known}, which does not divide the "
                f"{size_name} {total}, so the -1 cannot be inferred"
            )
        return tuple(total // known if d == -1 else d for d in dims)
    if known != total:
        raise ValueError(
            f"sharding_axis_dims {dims} multiply to {known} but the {size_name} is {total} {unit}; "
            f"the product must equal the {size_name} (or put -1 on one axis to infer it)"
        )
    return dims


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly (a probe's tiny inference forward is not worth a compilation)."""
    import torch

    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield
