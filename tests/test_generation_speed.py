"""The greedy fast path of the decoding loop (generation.greedy_decode) gives transformers' greedy tokens: mixed
prompt lengths, chat prompts sharing a system prompt (the shared prefix computed once), rows stopping at
different steps (the batch shrinks), max_new_tokens, several architectures, eager attention, a LoRA model; and
what it does not cover goes through ``model.generate``. Timings live in bench/generation.py, not here."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessorList

from hfbridge import generation
from hfbridge.data.formats import pad_id
from hfbridge.generation import (
    generate_batched,
    generate_ids,
    greedy_fast_path,
    prompt_ids,
    stop_ids,
)
from hfbridge.testing import build_tiny_causal_lm

SYSTEM = "You answer with a date in ISO format and nothing else, please."
PROMPTS = [
    "Date: May 1, 1999\nISO:",
    "hello",
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "March 3rd, 2021"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "the 4th of July, 1976, a long time ago"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Jan 5"}],
    "The quick brown fox jumps over the lazy dog and then some more words follow here",
    [{"role": "user", "content": "Convert March 9, 2021"}],
]


def reference(model, tokenizer, prompts, max_new_tokens, stops):
    """transformers' greedy decoding of each prompt alone (no padding), cut before the first stop token."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, prompt)])
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id(tokenizer), eos_token_id=sorted(stops),
                             temperature=None, top_p=None, top_k=None)[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        out.append(new[:cut])
    return out


def count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    def load(family, **overrides):
        path = build_tiny_causal_lm(tmp_path_factory.mktemp(family), family, tokenizer=tiny_tokenizer, **overrides)
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return load


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_same_tokens_as_transformers_mixed_lengths_and_chat(models, tiny_tokenizer, family, monkeypatch):
    model = models(family)
    assert greedy_fast_path(model, {"do_sample": False}, 64) is model
    decodes = count_calls(monkeypatch, generation, "greedy_decode")
    stops = stop_ids(tiny_tokenizer, model)
    fast = generate_ids(model, tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    assert len(decodes) == 3  # 7 prompts in batches of 3, all through the fast path
    assert fast == reference(model, tiny_tokenizer, PROMPTS, 12, stops)
    # and the same as the loop through model.generate, batched and left-padded as before
    assert fast == generate_ids(model, tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, fast_greedy=False)
    assert all(len(t) == 12 for t in fast)  # a random model never says EOS: every row ran to max_new_tokens


def test_rows_stopping_at_different_steps_leave_the_batch(models, tiny_tokenizer, monkeypatch):
    model = models("llama")
    free = generate_ids(model, tiny_tokenizer, PROMPTS, max_new_tokens=10, batch_size=7)
    # stop tokens the model does produce, at different steps in different rows
    stops = {free[0][2], free[3][5], free[5][0]} | stop_ids(tiny_tokenizer, model)
    first_stop = [next((i for i, t in enumerate(row) if t in stops), None) for row in free]
    assert len({s for s in first_stop if s is not None}) >= 2
    shrinks = count_calls(monkeypatch, generation._SlotCache, "keep_rows")
    pad = pad_id(tiny_tokenizer)
    encoded = [prompt_ids(tiny_tokenizer, p) for p in PROMPTS]

    def make_inputs(batch):
        ids, mask = generation.left_pad(batch, pad)
        return {"input_ids": ids, "attention_mask": mask}

    fast = generate_batched(model, encoded, [len(e) for e in encoded], make_inputs, max_new_tokens=10, batch_size=7,
                            pad_token_id=pad, stops=stops)
    assert shrinks, "no row left the batch"
    assert fast == reference(model, tiny_tokenizer, PROMPTS, 10, stops)
    assert fast == [row[:s] if s is not None else row for row, s in zip(free, first_stop)]


def test_shared_prefix_is_computed_once_and_reused_across_batches(models, tiny_tokenizer, monkeypatch):
    model = models("llama")
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"day {i}" + " x" * (i % 4)}]
             for i in range(10)]
    forwards = count_calls(monkeypatch, generation._Step, "__call__")
    fast = generate_ids(model, tiny_tokenizer, chats, max_new_tokens=5, batch_size=4)
    prefix_calls = [args for args in forwards if args[1].shape[0] == 1 and args[5] == 0]  # batch-1, from slot 0
    assert len(prefix_calls) == 1  # the system prompt once, for all three batches (4, 4 and 2 rows)
    encoded = [prompt_ids(tiny_tokenizer, c) for c in chats]
    shared = next(i for i in range(100) if len({tuple(e[: i + 1]) for e in encoded}) > 1)
    assert shared > 10 and prefix_calls[0][1].shape[1] >= shared
    batch_calls = [args for args in forwards if args[1].shape[0] > 1 and args[1].shape[1] > 1]
    assert len(batch_calls) == 3  # each covers only what follows the shared prefix
    assert all(args[1].shape[1] <= max(map(len, encoded)) - shared for args in batch_calls)
    assert fast == reference(model, tiny_tokenizer, chats, 5, stop_ids(tiny_tokenizer, model))


@pytest.mark.parametrize("max_new_tokens", [1, 2])
def test_max_new_tokens(models, tiny_tokenizer, max_new_tokens):
    model = models("llama")
    fast = generate_ids(model, tiny_tokenizer, PROMPTS, max_new_tokens=max_new_tokens, batch_size=4)
    assert [len(t) for t in fast] == [max_new_tokens] * len(PROMPTS)
    assert fast == reference(model, tiny_tokenizer, PROMPTS, max_new_tokens, stop_ids(tiny_tokenizer, model))


def test_eager_attention_and_a_lora_model(models, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    eager = build_tiny_causal_lm(tmp_path / "eager", tokenizer=tiny_tokenizer, seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(eager), attn_implementation="eager").eval()
    assert greedy_fast_path(model, {}, 64) is model
    stops = stop_ids(tiny_tokenizer, model)
    assert generate_ids(model, tiny_tokenizer, PROMPTS, max_new_tokens=6, batch_size=4) == \
        reference(model, tiny_tokenizer, PROMPTS, 6, stops)

    peft = get_peft_model(models("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.eval()
    assert greedy_fast_path(peft, {}, 64) is peft.get_base_model()
    assert generate_ids(peft, tiny_tokenizer, PROMPTS, max_new_tokens=6, batch_size=4) == \
        reference(peft, tiny_tokenizer, PROMPTS, 6, stops)


def test_what_the_fast_path_does_not_cover_goes_through_generate(models, tiny_tokenizer, monkeypatch):
    model = models("llama")
    for kwargs in ({"do_sample": True}, {"num_beams": 2}, {"logits_processor": LogitsProcessorList()},
                   {"repetition_penalty": 1.3}, {"output_scores": True}):
        assert greedy_fast_path(model, kwargs, 64) is None, kwargs
    penalised = models("llama")
    penalised.generation_config = GenerationConfig(repetition_penalty=1.5, pad_token_id=0)
    assert greedy_fast_path(penalised, {}, 64) is None
    windowed = models("mistral", sliding_window=16)
    assert greedy_fast_path(windowed, {}, 17) is None and greedy_fast_path(windowed, {}, 16) is windowed
    # a sliding window shorter than prompt + new tokens: model.generate, which windows the attention
    decodes = count_calls(monkeypatch, generation, "greedy_decode")
    out = generate_ids(windowed, tiny_tokenizer, PROMPTS[5:6], max_new_tokens=8, batch_size=1)
    assert not decodes and out == reference(windowed, tiny_tokenizer, PROMPTS[5:6], 8, stop_ids(tiny_tokenizer))
    # a repetition penalty asked for: model.generate applies it (the tokens change), the fast path is not used
    penalty = generate_ids(model, tiny_tokenizer, PROMPTS[:3], max_new_tokens=8, repetition_penalty=5.0)
    assert not decodes
    assert penalty != generate_ids(model, tiny_tokenizer, PROMPTS[:3], max_new_tokens=8)
    # stops without the model's EOS: generate ends rows there and pads them, so its tokens are kept exactly
    decodes.clear()
    pad = pad_id(tiny_tokenizer)
    encoded = [prompt_ids(tiny_tokenizer, p) for p in PROMPTS[:2]]
    generate_batched(model, encoded, [len(e) for e in encoded], lambda b: dict(zip(
        ("input_ids", "attention_mask"), generation.left_pad(b, pad))), max_new_tokens=3, batch_size=2,
        pad_token_id=pad, stops={pad})
    assert not decodes


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_rows_that_join_a_running_batch_get_their_own_answers(models, tiny_tokenizer, family, monkeypatch):
    """Continuous batching: prompts join between steps (shorter and longer than what the batch has used, with
    their own max_new_tokens, into an emptied batch too); every row gets the tokens it gets decoded alone."""
    model = models(family)
    encoded = [prompt_ids(tiny_tokenizer, p) for p in PROMPTS]
    stops = stop_ids(tiny_tokenizer, model)
    limits = [12, 12, 4, 9, 7, 3, 6]
    # before step 2: a long chat (the batch moves right) and a short prompt; before step 5: a chat shorter than
    # what the batch has used; the first rows end after 12 tokens, the batch empties, then the last one joins
    schedule = {2: [(encoded[3], limits[3]), (encoded[5], limits[5])], 5: [(encoded[2], limits[2])]}
    seen = []
    merges = count_calls(monkeypatch, generation, "_merge")

    def more(decoding):
        seen.append(decoding)
        if len(seen) - 1 in schedule:
            return schedule[len(seen) - 1]
        return [(encoded[4], limits[4])] if decoding == 0 and seen.count(0) == 1 else []

    out = generation.greedy_decode(model, [encoded[0], encoded[1]], max_new_tokens=12, pad_token_id=pad_id(
        tiny_tokenizer), stops=stops, more=more)
    order = [0, 1, 3, 5, 2, 4]
    widths = [[rows.used()[1] - rows.used()[0] for rows in args[:2]] for args in merges]
    assert widths[0][1] > widths[0][0] and widths[1][1] < widths[1][0]  # the batch moved right, then the new row
    assert len(out) == 6 and len(merges) == 2 and seen.count(0) == 2
    for got, i in zip(out, order):
        alone = reference(model, tiny_tokenizer, [PROMPTS[i]], limits[i] if i not in (0, 1) else 12, stops)[0]
        assert got == alone, i
    assert [len(t) for t in out] == [12, 12, 9, 3, 4, 7]


def test_an_empty_prompt_is_refused(models):
    model = models("llama")
    with pytest.raises(ValueError, match="at least one token"):
        generation.greedy_decode(model, [[1, 2], []], max_new_tokens=2, pad_token_id=0, stops=set())


@pytest.mark.slow
def test_embedded_model_same_tokens_as_transformers():
    """The embedded SmolLM2-135M-Instruct on demo prompts and another chat, of mixed lengths: every token equal to
    transformers' batched generate (one thread: a few seconds)."""
    from hfbridge.data.demo import date_records
    from hfbridge.data.formats import prompt_and_reference
    from hfbridge.models.loading import load_for_inference

    model, tokenizer = load_for_inference("smollm2-135m-instruct", dtype=torch.float32)
    prompts = [prompt_and_reference(r, "messages")[0] for r in date_records(3, 0, "test")]
    prompts.append([{"role": "user", "content": "What is the capital of France?"}])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fast = generate_ids(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
        ids, mask = generation.left_pad([prompt_ids(tokenizer, p) for p in prompts], pad_id(tokenizer))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=pad_id(tokenizer), temperature=None, top_p=None, top_k=None)
    finally:
        torch.set_num_threads(threads)
    stops = stop_ids(tokenizer, model)
    expected = [next((row[:i] for i, t in enumerate(row) if t in stops), row) for row in out[:, ids.shape[1]:].tolist()]
    assert fast == expected
    assert any(len(row) < 12 for row in fast) and any(len(row) >= 9 for row in fast)  # stopped and long rows
