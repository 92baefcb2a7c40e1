"""Context parallelism (the ``cp`` mesh axis): each sequence split over the cp ranks, attention exact through an
all-gather of keys and values. On 2 and 4 CPU processes (gloo) the step losses, the first step's gradients and the
weights after 3 steps equal one process on the same global batch, for cp=2 (padded and packed batches, activation
checkpointing), cp=2 x fsdp=2 and cp=2 x tp=2; the split's attention mask equals transformers' own mask."""

import pytest
import torch
from cp_worker import fit_cp, full_weights, tag, torchrun
from transformers import AutoModelForCausalLM
from transformers.masking_utils import create_causal_mask

from hfbridge.parallel import ParallelConfig
from hfbridge.parallel.context import (
    ContextParallelError,
    check_attention,
    check_model,
    chunk_indices,
    key_order,
    shard_batch,
)
from hfbridge.parallel.mesh import MESH_ORDER
from hfbridge.testing import tiny_llama_config

ATOL = 1e-5  # losses and gradients, as test_par_parity
WEIGHT_ATOL = 1e-4  # weights after 3 AdamW steps (as test_par_parity's logits after training)


# ------------------------------------------------------------------------------------------------ no process group
def test_cp_axis_sizes_and_four_sizes_still_valid():
    assert ParallelConfig(sharding_axis_dims=(1, -1, 1, 1, 2)).axis_sizes(8) == {
        "dp": 1, "fsdp": 4, "tp": 1, "sp": 1, "cp": 2}
    assert ParallelConfig(sharding_axis_dims=(1, -1, 2, 1)).axis_sizes(4)["cp"] == 1
    assert ParallelConfig(sharding_axis_dims=(2, -1), sharding_axis_names=("cp", "fsdp")).axis_sizes(4)["cp"] == 2
    assert MESH_ORDER == ("dp", "fsdp", "cp", "tp", "sp")
    with pytest.raises(ValueError, match="multiply to 4 but the world size is 2"):
        ParallelConfig(sharding_axis_dims=(1, 1, 2, 1, 2)).axis_sizes(2)


def test_chunks_are_load_balanced_and_cover_the_row():
    assert chunk_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert chunk_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert sorted(key_order(24, 3).tolist()) == list(range(24))
    with pytest.raises(ContextParallelError, match="cannot be cut into 2\\*cp=4"):
        chunk_indices(6, 2, 0)


def _reference_mask(batch, length):
    """transformers' own 4-D sdpa mask of the whole (padded) batch: [rows, 1, length, length]."""
    config = tiny_llama_config(300)
    config._attn_implementation = "sdpa"
    embeds = torch.zeros(batch["input_ids"].shape[0], length, 8)
    mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=batch.get("attention_mask"),
                              cache=None, position_ids=batch.get("position_ids"))
    if mask is None:  # no padding, no packing: plain causal
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    return mask.expand(embeds.shape[0], 1, length, length)


@pytest.mark.parametrize("kind", ["padded", "packed", "plain"])
def test_the_split_keeps_the_rows_and_transformers_mask(kind):
    """Every rank's tokens, labels and positions are its chunks of the row (padded to a multiple of 2*cp); its mask
    over the all-gathered keys is transformers' mask of the whole row, read at those positions."""
    cp, rows, length = 2, 2, 10  # 10 tokens: padded to 12 (3 per chunk)
    ids = torch.arange(rows * length).reshape(rows, length) + 5
    batch = {"input_ids": ids, "labels": ids + 1, "num_label_tokens": 7}
    if kind == "padded":
        batch["attention_mask"] = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    if kind == "packed":
        batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    padded = {k: torch.cat([v, torch.full((rows, 2), 0 if k != "labels" else -100)], 1) if torch.is_tensor(v) else v
              for k, v in batch.items()}
    positions = batch.get("position_ids", torch.arange(length).expand(rows, length))
    padded["position_ids"] = torch.cat([positions, positions[:, -1:] + torch.tensor([1, 2])], 1)
    expected = _reference_mask({k: padded[k] for k in ("input_ids", "attention_mask", "position_ids") if k in padded
                                and (k != "position_ids" or kind == "packed")}, 12)
    keys = key_order(12, cp)
    for rank in range(cp):
        local = chunk_indices(12, cp, rank)
        part = shard_batch(batch, cp, rank)
        assert part["num_label_tokens"] == 7
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(part[key], padded[key][:, local]), key
        mask = part["attention_mask"]
        assert mask.shape[-2:] == (6, 12)
        want = expected[:, :, local][:, :, :, keys]
        # on the CPU every layout here is computed block by block: the mask is a marker of one element that
        # carries the layout and builds the dense mask it stands for only where the blockwise kernel cannot run
        length_cp_rank, segments = mask._hfbridge_cp_blocks[:3], mask._hfbridge_cp_blocks[3]
        assert mask.untyped_storage().nbytes() == 1 and length_cp_rank == (12, cp, rank)
        assert (segments is not None) == (kind == "packed")
        assert torch.equal(mask._hfbridge_cp_dense().expand(rows, 1, 6, 12), want)
    assert (padded["labels"][:, -2:] == -100).all()


def test_unsupported_models_and_attention_are_refused_before_loading():
    with torch.device("meta"):
        llama = AutoModelForCausalLM.from_config(tiny_llama_config(300), attn_implementation="sdpa")
        eager = AutoModelForCausalLM.from_config(tiny_llama_config(300), attn_implementation="eager")
        sliding = AutoModelForCausalLM.from_config(tiny_llama_config(300, "mistral", sliding_window=16),
                                                   attn_implementation="sdpa")
        from transformers import GPT2Config

        gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2), attn_implementation="sdpa")
    check_model(llama, 2)
    with pytest.raises(ContextParallelError, match="needs attn_implementation='sdpa'.*not 'eager'"):
        check_model(eager, 2)
    with pytest.raises(ContextParallelError, match="sliding-window"):
        check_model(sliding, 2)
    with pytest.raises(ContextParallelError, match="implemented for the decoders of llama.*not 'gpt2'"):
        check_model(gpt2, 2)
    check_attention("eager", 1)  # cp=1 splits nothing


def test_a_cp_run_with_other_attention_or_method_fails_before_loading(monkeypatch):
    from hfbridge.parallel import runtime
    from hfbridge.recipe.config import resolve_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    base = {"model": {"name": "unused-never-loaded"}, "parallel": {"sharding_axis_dims": [1, 1, 1, 1, 2]}}
    with pytest.raises(ContextParallelError, match="needs attn_implementation='sdpa'"):
        runtime.start(resolve_config(None, {**base, "model": {"name": "x", "attn_implementation": "eager"}}))
    with pytest.raises(ContextParallelError, match="not 'dpo'"):
        runtime.start(resolve_config(None, {**base, "method": {"name": "dpo"}}))
    with pytest.raises(ValueError, match="multiply to 4 but the world size is 2"):
        runtime.start(resolve_config(None, {**base, "parallel": {"sharding_axis_dims": [1, 2, 1, 1, 2]}}))
    assert not torch.distributed.is_initialized()


# ------------------------------------------------------------------------------------------------ on processes
@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("cp")
    m = str(tiny_model_dir)
    two = {"cp=2, padded batches": f"{m}|1,1,1,1,2|", "cp=2, packed batches, activation checkpointing":
           f"{m}|1,1,1,1,2|packed ac", "cp=2, padded batches, activation checkpointing": f"{m}|1,1,1,1,2|ac"}
    four = {"cp=2 x fsdp=2": f"{m}|1,2,1,1,2|", "cp=2 x tp=2": f"{m}|1,1,2,1,2|"}
    torchrun(2, out, *two.values())
    torchrun(4, out, *four.values())
    return out, {**two, **four}


@pytest.fixture(scope="module")
def cp_references(tiny_model_dir):
    runs = {}
    for packed in (False, True):
        recorder, module = fit_cp(tiny_model_dir, packed=packed)
        runs[packed] = (recorder.losses, recorder.grads, full_weights(module.model))
    return runs


def test_cp_alone_and_with_fsdp_and_tp_equal_one_process(cp_runs, cp_references):
    out, jobs = cp_runs
    for name, job in jobs.items():
        ref_losses, ref_grads, ref_weights = cp_references["packed" in job]
        result = torch.load(out / f"cp-{tag(job)}.pt")
        assert len(result["losses"]) == len(ref_losses) == 3, name
        # right-padded and packed rows alike take the blockwise kernel, without a mask
        assert result["blockwise_calls"] > 0, (name, result["blockwise_calls"])
        assert result["losses"] == pytest.approx(ref_losses, abs=ATOL), name
        assert result["grads"].keys() == ref_grads.keys(), name
        for param, grad in ref_grads.items():
            assert torch.allclose(result["grads"][param], grad, atol=ATOL, rtol=0), (name, param)
        for param, weight in ref_weights.items():
            assert torch.allclose(result["weights"][param], weight, atol=WEIGHT_ATOL, rtol=0), (name, param)
        diffs = [max(abs(a - b) for a, b in zip(result["losses"], ref_losses)),
                 max(float((result["grads"][k] - g).abs().max()) for k, g in ref_grads.items()),
                 max(float((result["weights"][k] - w).abs().max()) for k, w in ref_weights.items())]
        print(f"{name}: max loss diff {diffs[0]:.1e}, gradient diff (step 1) {diffs[1]:.1e}, weight diff after "
              f"3 steps {diffs[2]:.1e}, blockwise attention calls {result['blockwise_calls']}")


def test_the_cp_test_can_fail(cp_references, tiny_model_dir):
    """The compared quantities move: training changed every weight by far more than the tolerance, and the padded
    and packed runs' first gradients are large enough to show a missing part of the sequence."""
    losses, grads, weights = cp_references[False]
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert max((weights[k] - initial[k]).abs().max() for k in weights) > 100 * WEIGHT_ATOL
    assert any(g.abs().max() > 100 * ATOL for g in grads.values())
    assert losses[0] - losses[-1] > 100 * ATOL
