"""The fused LoRA forward (``torch.addmm`` of the low-rank update into the base output) equals peft's own."""

import copy

import pytest
import torch

from hfbridge.models.peft_adapters import LoRA, fuse_lora_updates
from hfbridge.testing import build_tiny_causal_lm


def _pair(tmp_path, dropout=0.0):
    from transformers import AutoModelForCausalLM

    path = build_tiny_causal_lm(tmp_path / "m")
    model = LoRA(r=4, alpha=8, dropout=dropout)(AutoModelForCausalLM.from_pretrained(path))
    with torch.no_grad():  # lora_B starts at zero: give the update a value so that it is checked
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    reference = copy.deepcopy(model)
    for module in reference.modules():
        vars(module).pop("forward", None)  # peft's forward
    return model, reference


def _step(model, ids, seed=0):
    torch.manual_seed(seed)
    logits = model(input_ids=ids, use_cache=False).logits
    loss = logits.float().log_softmax(-1)[..., 0].mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_equals_peft_forward_and_gradients(tmp_path, dropout):
    model, reference = _pair(tmp_path, dropout)
    fused = sum("forward" in vars(m) for m in model.modules())
    assert fused > 0 and sum("forward" in vars(m) for m in reference.modules()) == 0
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    model.train(), reference.train()
    logits, grads = _step(model, ids)
    ref_logits, ref_grads = _step(reference, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(float(g.abs().max()) > 0 for g in grads.values())


def test_disabled_adapter_and_merge_use_peft_paths(tmp_path):
    from transformers import AutoModelForCausalLM

    model, reference = _pair(tmp_path)
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=ids).logits
        torch.testing.assert_close(base, plain)
        assert float((adapted - base).abs().max()) > 1e-3
        merged = model.merge_and_unload()(input_ids=ids).logits
        torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    assert fuse_lora_updates(reference) > 0


def test_adamw_runs_fused_on_plain_parameters_and_equals_the_loop():
    """AdamW's fused kernel is used for plain parameters on one device and takes the same steps as the
    per-tensor loop (the optimizer a sharded model keeps)."""
    from hfbridge.optim import OptimizerConfig, build_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [build_optimizer(m, OptimizerConfig(lr=1e-2, weight_decay=0.1), 10)[0] for m in models]
    assert optimizers[0].defaults["fused"] is True
    optimizers[1].param_groups[0]["fused"] = optimizers[1].param_groups[1]["fused"] = None  # the foreach loop
    for step in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        for m, opt in zip(models, optimizers):
            m(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("adapter", [False, True])
def test_fused_gated_mlp_equals_the_model_and_keeps_fewer_tensors(tmp_path, adapter):
    from transformers import AutoModelForCausalLM

    from hfbridge.models.fused_mlp import fuse_gated_mlps

    path = build_tiny_causal_lm(tmp_path / "m")
    models = [AutoModelForCausalLM.from_pretrained(path) for _ in range(2)]
    if adapter:
        models = [LoRA(r=4, alpha=8, dropout=0.0)(m) for m in models]
        models[1].load_state_dict(models[0].state_dict())
    assert fuse_gated_mlps(models[0]) == 2 and fuse_gated_mlps(models[0]) == 0
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    saved = []
    for m in models:
        count = [0]

        def pack(t, count=count):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, grads = _step(m, ids)
        saved.append((count[0], logits, grads))
    (ours, logits, grads), (theirs, ref_logits, ref_grads) = saved
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)
    intermediate = 128 * ids.numel()
    assert theirs - ours == 2 * intermediate  # one tokens x intermediate tensor less per layer (2 layers)
