"""Parameter trees as nested dicts addressed by ``/``-joined paths (``model/layers/0/self_attn/q_proj/kernel``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def is_param_leaf(x: Any) -> bool:
    """True for what a path names: an array, or a quantized array (two arrays that form one parameter)."""
    return not isinstance(x, Mapping)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{path: leaf}`` for a nested dict of parameters."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
    """The nested dict whose :func:`flatten` is ``flat``."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def map_with_path(fn: Callable[[str, Any], Any], tree: Mapping) -> dict:
    """Apply ``fn(path, leaf)`` to every parameter, keeping the nesting."""
    return unflatten({path: fn(path, leaf) for path, leaf in flatten(tree).items()})
