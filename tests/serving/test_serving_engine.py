"""The serving engine steers hfbridge's fast greedy loop and ``model.generate`` alike: a batch mixing greedy and
sampled rows, stop strings, streaming and different ``max_tokens`` gives the same tokens, texts, finish reasons
and streamed pieces on both paths, and each row the answer it gets alone."""

import pytest
from serve_helpers import served_tiny

from hfbridge import generation
from hfbridge.serving.engine import Engine, Row

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the date today?"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    served = served_tiny(tiny_model_dir)
    return Engine(served.model, served.tokenizer)


def decode(engine, specs, *, fast: bool):
    """Run rows built from ``specs`` (prompt, max_tokens, keyword arguments) as one batch; each row's tokens,
    text, finish reason and streamed pieces."""
    events: list[list] = []
    rows = []
    for prompt, max_tokens, kwargs in specs:
        events.append([])
        rows.append(Row(engine.encode(prompt), max_tokens, sink=events[-1].append, **kwargs))
    engine.fast_greedy = fast
    try:
        engine.run(rows)
    finally:
        engine.fast_greedy = True
    return [(r.tokens, r.text, r.finish_reason, [(e.kind, e.text) for e in sink]) for r, sink in zip(rows, events)]


def test_fast_path_and_generate_give_the_same_rows(engine, monkeypatch):
    alone = decode(engine, [(CHAT, 12, {})], fast=False)[0]
    stop = alone[1][4:7]  # a piece of the greedy answer, so the stop string does cut it
    assert len(stop) == 3 and alone[2] == "length"
    specs = [
        (CHAT, 12, {}),
        (CHAT, 12, {"stops": [stop], "stream": True}),
        ("Once upon a time", 7, {"temperature": 0.9, "seed": 3}),
        ("Once upon a time", 9, {"temperature": 1.3, "top_p": 0.8, "seed": 5, "stream": True}),
        ("hello", 1, {}),
        ("The quick brown fox jumps over the lazy dog and then", 5, {"stream": True}),
    ]
    decodes = []
    original = generation.greedy_decode
    monkeypatch.setattr(generation, "greedy_decode", lambda *a, **k: decodes.append(1) or original(*a, **k))
    fast = decode(engine, specs, fast=True)
    assert len(decodes) == 1  # the whole batch went through the fast loop, steered
    slow = decode(engine, specs, fast=False)
    assert len(decodes) == 1  # and the reference through model.generate
    assert fast == slow
    # each row as it would be alone: greedy, cut at the stop string, length limits, sampling reproducible
    assert fast[0][:3] == alone[:3]
    assert fast[1][2] == "stop" and fast[1][1] == alone[1][: alone[1].index(stop)]
    assert "".join(text for kind, text in fast[1][3] if kind == "delta") == fast[1][1]
    assert [len(f[0]) for f in fast] == [12, len(fast[1][0]), 7, 9, 1, 5]
    assert [f[2] for f in fast] == ["length", "stop", "length", "length", "length", "length"]
    for i in (2, 3):
        assert decode(engine, [specs[i]], fast=True)[0] == fast[i]
    assert fast[2][0] != decode(engine, [(specs[2][0], 7, {"temperature": 0.9, "seed": 4})], fast=True)[0][0]


def test_a_cancelled_row_leaves_the_fast_loop(engine):
    rows = [Row(engine.encode(CHAT), 12, index=0), Row(engine.encode(CHAT), 12, index=1)]
    rows[1].cancel()
    engine.run(rows)
    assert rows[0].finish_reason == "length" and len(rows[0].tokens) == 12
    assert rows[1].finish_reason == "cancelled" and rows[1].tokens == []


@pytest.mark.parametrize("continuous", [True, False])
def test_a_request_joins_the_running_batch_and_ends_first(make_server, monkeypatch, continuous):
    """Continuous batching through the server: a short request sent while a long one decodes joins its batch
    between two steps (no second batch), gets its sequential answer, and is answered before the long one ends;
    with ``--no-continuous-batching`` it waits for the next batch (the same answers, later)."""
    import threading
    import time

    from serve_helpers import MODEL_ID, client_for, served

    server = make_server(max_new_tokens=64, continuous_batching=continuous)
    batcher, engine = served(server).batcher, served(server).engine
    long_chat = [{"role": "user", "content": "Tell me a long story about a fox."}]
    with client_for(server) as client:
        def ask(messages, max_tokens):
            reply = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=max_tokens,
                                                   temperature=0)
            return reply.choices[0].message.content, reply.usage.completion_tokens, time.monotonic()

        alone = [ask(long_chat, 60), ask(CHAT, 5)]
        batches = engine.generate_calls  # counted when a batch starts (the batcher counts after its answers)
        forward = generation._Step.__call__

        def slow(self, *args, **kwargs):
            time.sleep(0.02)
            return forward(self, *args, **kwargs)

        monkeypatch.setattr(generation._Step, "__call__", slow)
        results = {}
        long = threading.Thread(target=lambda: results.setdefault("long", ask(long_chat, 60)))
        long.start()
        time.sleep(0.4)  # the long request's batch is some steps in (60 steps take over a second)
        results["short"] = ask(CHAT, 5)
        long.join(30)
    assert results["long"][:2] == alone[0][:2] and results["short"][:2] == alone[1][:2]
    if continuous:
        assert engine.generate_calls - batches == 1 and batcher.rows_joined == 1
        assert results["short"][2] < results["long"][2]
    else:
        assert engine.generate_calls - batches == 2 and batcher.rows_joined == 0
        assert results["short"][2] > results["long"][2]


def test_shared_system_prompts_are_kept_across_batches(engine, monkeypatch):
    """Batches whose rows share a system prompt compute it once and keep it, for several system prompts: a later
    request with either starts its forward after it, and still gets the answer ``model.generate`` gives."""
    systems = [{"role": "system", "content": "You are a helpful assistant who answers in one short sentence."},
               {"role": "system", "content": "Answer like a pirate would, with many words and much colour."}]
    chats = [[[system, {"role": "user", "content": text}] for text in ("What day is it?", "Name a colour.",
                                                                       "Say hello to the fox.")]
             for system in systems]
    from hfbridge.serving.engine import PREFIXES

    engine.prefixes = generation.PrefixStore(PREFIXES)
    shared = []
    for chat in chats:  # two rows each: their shared prefix is computed once and stored
        decode(engine, [(chat[0], 4, {}), (chat[1], 4, {})], fast=True)
        shared.append(len(engine.prefixes.ids))
        assert shared[-1] >= len(engine.encode([chat[0][0]])) - 2  # the system prompt (and the template around it)
    assert len(engine.prefixes.entries) == 2
    forward = generation._Step.__call__
    for chat, length in zip(chats, shared):
        starts: list[int] = []

        def spy(self, *a, starts=starts):
            starts.append(a[-1])
            return forward(self, *a)

        monkeypatch.setattr(generation._Step, "__call__", spy)
        later = decode(engine, [(chat[2], 6, {})], fast=True)
        assert starts[0] == length and 0 not in starts  # nothing recomputed from the first slot
        monkeypatch.setattr(generation._Step, "__call__", forward)
        assert later == decode(engine, [(chat[2], 6, {})], fast=False)


def test_no_row_joins_a_model_with_a_sliding_window(tmp_path, tiny_tokenizer, monkeypatch):
    """A joining row's length is not known when the fast path is chosen for the batch, and the fast loop is
    exact only within the window: under a sliding window nothing joins (the batch still runs the fast loop)."""
    from hfbridge.models.loading import load_for_inference
    from hfbridge.testing import build_tiny_causal_lm

    folder = build_tiny_causal_lm(tmp_path / "mistral", "mistral", tokenizer=tiny_tokenizer, sliding_window=128)
    model, tokenizer = load_for_inference(folder)
    engine = Engine(model, tokenizer)
    assert generation.sliding_window(model) == 128
    asked = []
    decodes = []
    original = generation.greedy_decode
    monkeypatch.setattr(generation, "greedy_decode", lambda *a, **k: decodes.append(k["more"]) or original(*a, **k))
    row = Row(engine.encode(CHAT), 4)
    engine.run([row], joining=lambda decoding: asked.append(decoding) or [])
    assert decodes == [None] and asked == [] and len(row.tokens) == 4
