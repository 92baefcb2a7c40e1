"""A (sharded) training step: masked next-token cross-entropy and an optax optimizer, jitted."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hfbridge.jax import tree as tree_lib
from hfbridge.jax.mesh import PartitionAxis
from hfbridge.jax.quant import QuantizedArray
from hfbridge.jax.rules import fit_spec

IGNORE_INDEX = -100


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over positions where ``mask`` is true (computed in float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def causal_lm_loss(module: Any, params: dict, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Next-token loss of ``batch`` (``input_ids``, optional ``attention_mask`` and ``labels`` with -100 ignored)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = jnp.ones_like(ids)
    labels = batch.get("labels")
    if labels is None:
        labels = jnp.where(mask.astype(bool), ids, IGNORE_INDEX)
    logits = module.apply(params, ids, mask)
    labels = labels[:, 1:]
    valid = labels != IGNORE_INDEX
    return masked_cross_entropy(logits[:, :-1], jnp.where(valid, labels, 0), valid)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, partition_axis: PartitionAxis | None = None) -> dict:
    """Place ``(batch, seq)`` arrays on ``mesh``: batch over ``batch_axis``, sequence over ``sequence_axis``."""
    pa = partition_axis or PartitionAxis()
    out = {}
    for key, value in batch.items():
        value = jnp.asarray(value)
        spec = fit_spec(P(pa.batch_axis, pa.sequence_axis), value.shape, mesh)
        out[key] = jax.device_put(value, NamedSharding(mesh, spec))
    return out


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def init_opt_state(optimizer: Any, params: dict) -> Any:
    """``optimizer.init(params)`` with per-parameter states (Adam's moments) placed like the parameters and the
    rest (step counts) replicated over the parameters' mesh."""
    _check_trainable(params)
    state = optimizer.init(params)
    param_def = jax.tree.structure(params)
    shardings = _shardings(params)
    first = jax.tree.leaves(shardings)[0]
    replicated = NamedSharding(first.mesh, P()) if isinstance(first, NamedSharding) else first

    def is_param_like(node: Any) -> bool:
        return jax.tree.structure(node) == param_def

    def place(node: Any) -> Any:
        return jax.device_put(node, shardings if is_param_like(node) else replicated)

    return jax.tree.map(place, state, is_leaf=is_param_like)


def _check_trainable(params: dict) -> None:
    quantized = [p for p, leaf in tree_lib.flatten(params).items() if isinstance(leaf, QuantizedArray)]
    if quantized:
        raise ValueError(
            f"8-bit parameters cannot be trained ({quantized[:3]}...); load without load_in_8bit for training"
        )


def make_train_step(
    module: Any, optimizer: Any, loss_fn: Callable | None = None
) -> Callable[[dict, Any, Mapping[str, jax.Array]], tuple[dict, Any, jax.Array]]:
    """``step(params, opt_state, batch) -> (params, opt_state, loss)``, jitted on first call.

    Outputs keep the inputs' shardings (parameters and optimizer states stay where they were, e.g. sharded by
    the partition rules); the input buffers are donated.
    """
    loss_fn = loss_fn or causal_lm_loss

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(module, p, batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
        return params, opt_state, loss

    compiled: dict[str, Any] = {}

    def run(params, opt_state, batch):
        if "fn" not in compiled:
            _check_trainable(params)
            out = (_shardings(params), _shardings(opt_state), None)
            compiled["fn"] = jax.jit(step, out_shardings=out, donate_argnums=(0, 1))
        return compiled["fn"](params, opt_state, batch)

    return run
