"""Preference records: both forms, the scored tokens, and bad records named before any model loads."""

import json

import pytest

from hfbridge.data.formats import DataFormatError
from hfbridge.data.packing import PackedCollator
from hfbridge.data.preference import (
    PreferenceCollator,
    load_preference_records,
    tokenize_preference_example,
)


def _scored(tokenizer, sample):
    return tokenizer.decode([t for t in sample.labels if t != -100])


def test_string_pairs_score_the_completion_and_eos(tiny_tokenizer, string_pairs):
    examples, fmt = load_preference_records(string_pairs)
    assert fmt == "preference" and not examples[0].conversational
    s = tokenize_preference_example(tiny_tokenizer, examples[3])
    chosen, rejected = s.sequences
    assert _scored(tiny_tokenizer, chosen) == "it is 6" + tiny_tokenizer.eos_token
    assert _scored(tiny_tokenizer, rejected) == "maybe 10 or so" + tiny_tokenizer.eos_token
    n = len(s.prompt_ids)
    assert chosen.input_ids[:n] == rejected.input_ids[:n] == s.prompt_ids  # one prompt, tokenized once
    assert chosen.labels[: n - 1] == [-100] * (n - 1)


def test_conversations_score_only_the_final_assistant_turn_with_its_end_of_turn(tiny_tokenizer):
    records = [
        {"chosen": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "again"},
                    {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "again"},
                      {"role": "assistant", "content": "no way"}]},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "bye"}]},
    ]
    examples, _ = load_preference_records(records)
    first = tokenize_preference_example(tiny_tokenizer, examples[0])
    assert _scored(tiny_tokenizer, first.sequences[0]) == "yes<|im_end|>\n"  # not the earlier assistant turn
    assert _scored(tiny_tokenizer, first.sequences[1]) == "no way<|im_end|>\n"
    second = tokenize_preference_example(tiny_tokenizer, examples[1])
    assert _scored(tiny_tokenizer, second.sequences[0]) == "hello<|im_end|>\n"
    assert tiny_tokenizer.decode(second.prompt_ids).endswith("<|im_start|>assistant\n")


def test_kto_records(tiny_tokenizer):
    examples, fmt = load_preference_records([
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "5"}],
         "label": False},
    ])
    assert fmt == "kto" and [e.desirable for e in examples] == [True, False]
    batch = PreferenceCollator(tiny_tokenizer.pad_token_id)(
        [tokenize_preference_example(tiny_tokenizer, e) for e in examples])
    assert batch["desirable"].tolist() == [True, False]
    # the KL batch pairs each prompt with the previous example's completion
    assert batch["kl"]["input_ids"].shape[0] == 2


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"chosen": "a", "rejected": "b"}, "string pairs need a string 'prompt'"),
    ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "must both be strings"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, "share every turn"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "user", "content": "a"}],
      "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}]}, "no assistant turn"),
])
def test_bad_pairs_are_named_with_their_line(tmp_path, record, message):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataFormatError, match=message) as info:
        load_preference_records(path)
    assert "pairs.jsonl:2" in str(info.value)


def test_a_kto_label_must_be_a_boolean():
    with pytest.raises(DataFormatError, match="'label' must be true"):
        load_preference_records([{"prompt": "p", "completion": "c", "label": "yes"}])


def test_a_prompt_longer_than_the_budget_is_an_error(tiny_tokenizer, string_pairs):
    examples, _ = load_preference_records([{**string_pairs[0], "prompt": "word " * 50}])
    with pytest.raises(DataFormatError, match="leaves no completion token within max_length=16"):
        tokenize_preference_example(tiny_tokenizer, examples[0], max_length=16)


def test_packed_and_padded_batches_hold_the_same_sequences(tiny_tokenizer, string_pairs):
    examples, _ = load_preference_records(string_pairs[:3])
    samples = [tokenize_preference_example(tiny_tokenizer, e) for e in examples]
    padded = PreferenceCollator(tiny_tokenizer.pad_token_id)(samples)
    packed = PreferenceCollator(tiny_tokenizer.pad_token_id, PackedCollator(tiny_tokenizer.pad_token_id, 64))(samples)
    assert padded["input_ids"].shape[0] == 6 and packed["input_ids"].shape[0] < 6
    for seq in range(6):  # sequence i is chosen pair i, sequence 3 + i its rejected
        a = padded["labels"][padded["sequence_ids"] == seq]
        b = packed["labels"][packed["sequence_ids"] == seq]
        assert a.tolist() == b.tolist()
    assert int(padded["num_pairs_micro"]) == 3


def test_shared_prompt_rows_hold_each_prompt_once_and_give_the_padded_numbers(tiny_model_dir, tiny_tokenizer,
                                                                             string_pairs, chat_pairs):
    import torch

    from hfbridge import LoRA
    from hfbridge.data.preference import PREFIX_ID, shared_prompt_is_exact
    from hfbridge.models.preference import HFPreferenceModel

    module = HFPreferenceModel(model_name=str(tiny_model_dir), tokenizer=tiny_tokenizer, method="dpo",
                               model_transform=LoRA(r=4, alpha=8, dropout=0.0))
    module.configure_model()
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    assert shared_prompt_is_exact(module.model)[0]
    for records in (string_pairs[:5], chat_pairs[:5]):
        examples, _ = load_preference_records(records)
        samples = [tokenize_preference_example(tiny_tokenizer, e) for e in examples]
        padded = PreferenceCollator(tiny_tokenizer.pad_token_id)(samples)
        shared = PreferenceCollator(tiny_tokenizer.pad_token_id, PackedCollator(tiny_tokenizer.pad_token_id, 96),
                                    share_prompt=True)(samples)
        assert shared["attention_mask"].dim() == 4
        prompt_tokens = sum(len(s.prompt_ids) - 1 for s in samples)
        assert int((shared["sequence_ids"] == PREFIX_ID).sum()) == prompt_tokens  # each prompt once
        assert module.batch_token_counts(shared)[0] == module.batch_token_counts(padded)[0] - prompt_tokens
        results = []
        for batch in (padded, shared):
            module.model.zero_grad()
            out = module.preference_outputs(batch)
            out["loss"].backward()
            grads = torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None])
            results.append((out["loss"].item(), out["rewards/margins"], out["logps/rejected"], grads))
        (l0, m0, r0, g0), (l1, m1, r1, g1) = results
        assert abs(l0 - l1) < 1e-6 and abs(m0 - m1) < 1e-5 and abs(r0 - r1) < 1e-4
        assert torch.allclose(g0, g1, atol=1e-6)
