"""A (sharded) training step: masked cross-entropy on already-shifted labels and an optax optimizer, jitted.

Label convention (hfbridge's, the same as the PyTorch side: ``hfbridge.losses``): ``labels[:, t]`` is the token
the model must predict after reading ``input_ids[:, : t + 1]``; -100 (and ``loss_mask`` 0) marks positions that
are not trained; the loss is the sum over trained positions divided by their count (or by the batch's
``num_label_tokens``, the count over a whole optimizer step, when given). Batches built by hfbridge's data path
(``tokenize_records`` + ``PaddedCollator``) carry such labels and can be fed as they are; a batch without
``labels`` gets them from :func:`labels_from_inputs` (the shift happens there, once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hfbridge.jax import tree as tree_lib
from hfbridge.jax.mesh import PartitionAxis
from hfbridge.jax.quant import QuantizedArray
from hfbridge.jax.rules import fit_spec

IGNORE_INDEX = -100
NUM_LABEL_TOKENS_KEY = "num_label_tokens"


def masked_cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array, normalizer: jax.Array | float | None = None
) -> jax.Array:
    """Cross-entropy of ``logits`` against ``labels`` (aligned: no shift) summed where ``mask`` is true, divided by
    ``normalizer`` (default: the number of such positions, at least 1). Computed in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    denominator = jnp.maximum(jnp.sum(mask), 1.0) if normalizer is None else jnp.asarray(normalizer, jnp.float32)
    return jnp.sum(nll * mask) / denominator


def labels_from_inputs(input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Next-token labels for a batch without them: ``labels[:, t] = input_ids[:, t + 1]`` where that token is real
    (``attention_mask`` 1), -100 elsewhere and at the last position; what ``shift_for_causal_lm`` gives a fully
    trained text, so both data paths train the same targets."""
    ids = jnp.asarray(input_ids)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask)
    nxt = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    keep = jnp.concatenate([mask[:, 1:].astype(bool), jnp.zeros_like(mask[:, :1], bool)], axis=1)
    return jnp.where(keep, nxt, IGNORE_INDEX)


def causal_lm_loss(module: Any, params: dict, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The loss of ``batch``: ``input_ids``, optional ``attention_mask``, ``position_ids``, ``labels`` (already
    shifted, -100 ignored; derived by :func:`labels_from_inputs` when absent), ``loss_mask`` and
    ``num_label_tokens``."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = jnp.ones_like(ids)
    labels = batch.get("labels")
    if labels is None:
        labels = labels_from_inputs(ids, mask)
    logits = module.apply(params, ids, mask, batch.get("position_ids"))
    valid = labels != IGNORE_INDEX
    if batch.get("loss_mask") is not None:
        valid = valid & batch["loss_mask"].astype(bool)
    return masked_cross_entropy(logits, jnp.where(valid, labels, 0), valid, batch.get(NUM_LABEL_TOKENS_KEY))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, partition_axis: PartitionAxis | None = None) -> dict:
    """Place ``(batch, seq)`` arrays on ``mesh``: batch over ``batch_axis``, sequence over ``sequence_axis``
    (torch tensors and numpy arrays accepted; int64 becomes int32; scalars are replicated)."""
    pa = partition_axis or PartitionAxis()
    out = {}
    for key, value in batch.items():
        if not isinstance(value, jax.Array):
            value = np.asarray(value)
            value = value.astype(np.int32) if value.dtype == np.int64 else value
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
