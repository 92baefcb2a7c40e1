"""hfbridge's DPO family against TRL's own ``DPOTrainer`` (1.16) on one batch of a tiny random Llama: the same
tokens scored, the same loss, every metric both log, and every gradient, in float32.

The policy differs from its reference (perturbed weights for full fine-tuning, a non-zero LoRA update for an
adapter), so rewards, margins and accuracies are not trivially zero. TRL's side is built in
``trl_reference.py`` (whose docstring says exactly how TRL tokenizes and scores) and is itself checked here
against a plain PyTorch computation of the same formulas.

Tolerances: the loss ``rtol=1e-5``; the metrics ``atol=1e-5`` (a reward is ``beta * (logp - ref_logp)``, a
difference of two sums of about 30 log-probabilities, so float32 cancellation leaves about 1e-7 absolute,
whatever the reward's size); each gradient tensor ``rtol=1e-4`` with ``atol`` 1e-5 of its largest entry (TRL
and hfbridge sum the output head's gradient over tokens in different orders: TRL's chunked kernel accumulates
tiles, hfbridge its own chunks).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from trl_reference import trl_dpo_reference

from hfbridge.data.preference import PreferenceDataModule
from hfbridge.models.peft_adapters import LoRA
from hfbridge.models.preference import HFPreferenceModel

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft's wrapping

BETA = 0.1
SHARED_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                  "logps/rejected")
# Records whose prompt ends on a token boundary (no space before the completion's first word), so that TRL's
# joint tokenization of prompt + completion and a separate one agree; the pairs differ in length.
STRING_RECORDS = [
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Lyon, I think."},
    {"prompt": "Convert the date to ISO 8601: March 3rd, 2021 ->", "chosen": " 2021-03-03",
     "rejected": " 2021-3-3, or March 3."},
    {"prompt": "Monday Tuesday", "chosen": " Wednesday Thursday Friday", "rejected": " Sunday"},
]
CHAT_RECORDS = [
    {"prompt": [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "The capital of France is Lyon."}]},
    {"prompt": [{"role": "user", "content": "Convert the date to ISO 8601: March 3rd, 2021"}],
     "chosen": [{"role": "assistant", "content": "2021-03-03"}],
     "rejected": [{"role": "assistant", "content": "March 3, 2021"}]},
]
METHOD = {"sigmoid": "dpo", "ipo": "ipo", "hinge": "hinge"}


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def perturbed(base):
    """The policy of the full fine-tuning cases: the base model moved a little (the reference stays the base)."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def hfbridge_step(model, tokenizer, records, loss_type, label_smoothing=0.0, lora=None, packing=False,
                  policy_state=None):
    """hfbridge's loss, metrics and gradients on ``records`` as one batch, and the batch."""
    module = HFPreferenceModel(model_name=copy.deepcopy(model), tokenizer=tokenizer, method=METHOD[loss_type],
                               beta=BETA, label_smoothing=label_smoothing,
                               reference="adapter" if lora else "copy", model_transform=lora, chunked_loss=True)
    module.configure_model()
    if policy_state is not None:  # after the reference copy was taken: the policy moves away from it
        with torch.no_grad():
            params = dict(module.model.named_parameters())
            for name, value in policy_state.items():
                params[name].copy_(value)
    dm = PreferenceDataModule(tokenizer, records, batch_size=len(records), packing=packing)
    batch = next(iter(dm.train_dataloader()))
    module.model.train()
    out = module.preference_outputs(batch)
    module.model.zero_grad(set_to_none=True)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    metrics = {k: float(out[k]) for k in out["metric_sums"]}  # every metric hfbridge logs, under its name
    return {"loss": float(out["loss"].detach()), "metrics": metrics, "grads": grads, "batch": batch, "module": module}


def sequences_hfbridge(batch) -> list[tuple[tuple, tuple]]:
    """Each sequence of an hfbridge batch (padded or packed) as (its input tokens, its label tokens)."""
    ids, labels, seq = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1), batch["sequence_ids"].reshape(-1)
    n = int(seq.max()) + 1
    return [(tuple(ids[seq == i].tolist()), tuple(labels[seq == i].tolist())) for i in range(n)]


def sequences_trl(batch) -> list[tuple[tuple, tuple]]:
    """The same for TRL's batch, shifted as hfbridge shifts: inputs ``ids[:-1]``, labels ``ids[1:]`` where the
    completion mask is set (-100 elsewhere)."""
    out = []
    for ids, att, comp in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        ids, comp = ids[att.bool()], comp[att.bool()]
        labels = torch.where(comp[1:].bool(), ids[1:], torch.full_like(ids[1:], -100))
        out.append((tuple(ids[:-1].tolist()), tuple(labels.tolist())))
    return out


def pairs(sequences):
    n = len(sequences) // 2
    return sorted(zip(sequences[:n], sequences[n:]))


def assert_same(ours, theirs):
    """The same scored tokens, loss, gradients and every metric both log (at least TRL's six reward and
    log-probability metrics)."""
    assert pairs(sequences_hfbridge(ours["batch"])) == pairs(sequences_trl(theirs["batch"]))
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-7)
    assert ours["grads"].keys() == theirs["grads"].keys()
    for name, grad in theirs["grads"].items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(ours["grads"][name], grad, rtol=1e-4, atol=1e-5 * max(scale, 1e-6), msg=name)
    assert any(float(g.abs().max()) > 0 for g in theirs["grads"].values())
    shared = set(ours["metrics"]) & set(theirs["metrics"])
    assert set(SHARED_METRICS) <= shared
    mismatched = {key: (ours["metrics"][key], theirs["metrics"][key]) for key in sorted(shared)
                  if ours["metrics"][key] != pytest.approx(theirs["metrics"][key], abs=1e-5)}
    assert not mismatched, f"metrics (hfbridge, TRL): {mismatched}"


# --------------------------------------------------------------------------------- the reference itself
def _hand(policy, ref, batch, loss_type, eps):
    """The DPO-family formulas in plain PyTorch on TRL's batch (full logits, log_softmax)."""
    ids, att, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]

    def logps(model):
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        token = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (token * comp[:, 1:]).sum(1)

    pc, pr = logps(policy).chunk(2)
    with torch.no_grad():
        rc, rr = logps(ref).chunk(2)
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":  # conservative DPO when eps > 0
        loss = -(1 - eps) * F.logsigmoid(BETA * h) - eps * F.logsigmoid(-BETA * h)
    elif loss_type == "ipo":
        nc, nr = comp.sum(1).float().chunk(2)
        loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * BETA)) ** 2
    else:
        loss = torch.relu(1 - BETA * h)
    loss = loss.mean()
    loss.backward()
    loss = loss.detach()
    chosen, rejected = BETA * (pc - rc).detach(), BETA * (pr - rr).detach()
    metrics = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
               "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean(),
               "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    return float(loss), {k: float(v.detach()) for k, v in metrics.items()}, {n: p.grad for n, p in policy.named_parameters()}


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_the_trl_reference_is_the_dpo_formulas(base, perturbed, tiny_tokenizer, loss_type, eps):
    theirs = trl_dpo_reference(perturbed, base, tiny_tokenizer, STRING_RECORDS, loss_type=loss_type, beta=BETA,
                               label_smoothing=eps)
    policy = copy.deepcopy(perturbed)
    loss, metrics, grads = _hand(policy, base, theirs["batch"], loss_type, eps)
    assert theirs["loss"] == pytest.approx(loss, rel=1e-5)
    for key, value in metrics.items():
        assert theirs["metrics"][key] == pytest.approx(value, abs=1e-5), key
    for name, grad in grads.items():
        torch.testing.assert_close(theirs["grads"][name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()))
    assert 0 < metrics["rewards/accuracies"] < 1 or metrics["rewards/margins"] != 0


def test_trl_tokenizes_as_its_docstring_says(tiny_tokenizer, base, perturbed):
    """Strings: prompt tokens, then the completion and the EOS token; conversations: the chat template's
    generation prompt, then the assistant turn through its end-of-turn and newline tokens."""
    tok = tiny_tokenizer
    string = trl_dpo_reference(perturbed, base, tok, STRING_RECORDS[:1])["batch"]
    prompt = tok(STRING_RECORDS[0]["prompt"]).input_ids
    chosen = tok(STRING_RECORDS[0]["chosen"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    row = string["input_ids"][0][string["attention_mask"][0].bool()].tolist()
    assert row == prompt + chosen
    assert string["completion_mask"][0][: len(row)].tolist() == [0] * len(prompt) + [1] * len(chosen)
    chat = trl_dpo_reference(perturbed, base, tok, CHAT_RECORDS[1:])["batch"]
    text = tok.apply_chat_template(CHAT_RECORDS[1]["prompt"], tokenize=False, add_generation_prompt=True)
    completion = "2021-03-03<|im_end|>\n"
    row = chat["input_ids"][0][chat["attention_mask"][0].bool()].tolist()
    assert row == tok(text + completion, add_special_tokens=False).input_ids
    n_completion = len(tok(completion, add_special_tokens=False).input_ids)
    assert chat["completion_mask"][0][: len(row)].sum() == n_completion


# --------------------------------------------------------------------------------- hfbridge against TRL
@pytest.mark.parametrize("loss_type,eps,records,packing", [
    ("sigmoid", 0.0, "string", False),
    ("sigmoid", 0.0, "chat", True),
    ("sigmoid", 0.1, "string", False),
    ("ipo", 0.0, "string", False),
    ("hinge", 0.0, "chat", False),
], ids=["dpo-string", "dpo-chat-packed", "dpo-smoothed", "ipo", "hinge"])
def test_full_fine_tuning_matches_trl(base, perturbed, tiny_tokenizer, loss_type, eps, records, packing):
    records = STRING_RECORDS if records == "string" else CHAT_RECORDS
    theirs = trl_dpo_reference(perturbed, base, tiny_tokenizer, records, loss_type=loss_type, beta=BETA,
                               label_smoothing=eps)
    ours = hfbridge_step(base, tiny_tokenizer, records, loss_type, eps, packing=packing,
                         policy_state=dict(perturbed.named_parameters()))
    assert_same(ours, theirs)


@pytest.mark.parametrize("loss_type,records", [("sigmoid", "chat"), ("ipo", "string"), ("hinge", "string")])
def test_lora_with_the_adapter_disabled_as_reference_matches_trl(base, tiny_tokenizer, loss_type, records):
    from peft import LoraConfig

    records = STRING_RECORDS if records == "string" else CHAT_RECORDS
    lora = LoRA(r=4, alpha=8, dropout=0.0)  # every linear layer of the decoder
    # hfbridge's adapter with a non-zero update (B = 0 at peft's init would make policy and reference equal)
    module = HFPreferenceModel(model_name=copy.deepcopy(base), tokenizer=tiny_tokenizer, model_transform=lora)
    module.configure_model()
    g = torch.Generator().manual_seed(2)
    adapter = {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in module.model.named_parameters()
               if p.requires_grad}
    assert adapter and all(".lora_" in n for n in adapter)
    theirs = trl_dpo_reference(
        base, None, tiny_tokenizer, records, loss_type=loss_type, beta=BETA,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
        adapter_weights=adapter)
    ours = hfbridge_step(base, tiny_tokenizer, records, loss_type, lora=lora, policy_state=adapter)
    assert ours["module"].reference_mode == "adapter"
    assert_same(ours, theirs)
