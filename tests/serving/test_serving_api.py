"""The OpenAI-compatible endpoints, spoken to with the official ``openai`` client: answers equal hfbridge's own
generation, streaming equals the whole answer, ``seed`` reproduces sampling, ``stop`` cuts the text, ``n`` and usage
are right, and concurrent clients are decoded together with the answers they would get alone."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import MODEL_ID, served

from hfbridge.generation import generate_ids, prompt_ids

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the date today?"}]


def chat(client, messages=CHAT, **kwargs):
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **{"max_tokens": 12,
                                                                                "temperature": 0, **kwargs})


def streamed_text(stream) -> tuple[dict[int, str], dict[int, str], object]:
    """Each choice's concatenated text and finish reason, and the usage chunk (if any)."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def test_health_and_models(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert served(server).batcher.waiting == 0


def test_chat_answer_is_hfbridge_generation_and_counts_usage(server, client):
    engine = served(server).engine
    expected = generate_ids(engine.model, engine.tokenizer, [CHAT], max_new_tokens=12)[0]
    reply = chat(client)
    assert reply.object == "chat.completion" and reply.model == MODEL_ID
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == ("length" if len(expected) == 12 else "stop")
    n_prompt = len(prompt_ids(engine.tokenizer, CHAT))  # the chat template, as training renders it
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (n_prompt, len(expected))
    assert reply.usage.total_tokens == n_prompt + len(expected)


def test_completions_take_text_and_token_ids(server, client):
    engine = served(server).engine
    ids = prompt_ids(engine.tokenizer, "Date: May 3, 1999\nISO:")
    by_text = client.completions.create(model=MODEL_ID, prompt="Date: May 3, 1999\nISO:", max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=6, temperature=0)
    assert by_text.object == "text_completion" and by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    two = client.completions.create(model=MODEL_ID, prompt=["one", "two"], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == client.completions.create(model=MODEL_ID, prompt="one", max_tokens=4,
                                                            temperature=0).choices[0].text


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_the_stream_adds_up_to_the_whole_answer(client, endpoint):
    if endpoint == "chat":
        whole = chat(client, max_tokens=20)
        texts, reasons, usage = streamed_text(chat(client, max_tokens=20, stream=True,
                                                   stream_options={"include_usage": True}))
        expected = whole.choices[0].message.content
    else:
        kwargs = {"model": MODEL_ID, "prompt": "The capital of France is", "max_tokens": 20, "temperature": 0}
        whole = client.completions.create(**kwargs)
        texts, reasons, usage = streamed_text(client.completions.create(**kwargs, stream=True,
                                                                        stream_options={"include_usage": True}))
        expected = whole.choices[0].text
    assert texts == {0: expected} and reasons == {0: whole.choices[0].finish_reason}
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_the_stream_arrives_in_pieces(client):
    chunks = list(chat(client, max_tokens=20, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # incremental, not the whole text at the end
    assert chunks[0].choices[0].delta.role == "assistant"


def test_a_seed_makes_sampling_reproducible(client):
    first = chat(client, temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    again = chat(client, temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    greedy = chat(client, max_tokens=16)
    assert first.choices[0].message.content == again.choices[0].message.content
    others = {chat(client, temperature=1.0, seed=s, max_tokens=16).choices[0].message.content for s in range(4)}
    assert len(others | {greedy.choices[0].message.content}) > 1  # sampling does sample
    texts, _, _ = streamed_text(chat(client, temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, stream=True))
    assert texts[0] == first.choices[0].message.content


def test_stop_cuts_before_the_stop_string_also_when_streaming(client):
    full = chat(client, max_tokens=24).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]  # characters that need not fall on a token boundary
    cut = full[: full.find(stop)]
    reply = chat(client, max_tokens=24, stop=stop)
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    texts, reasons, _ = streamed_text(chat(client, max_tokens=24, stop=[stop, "never-there"], stream=True))
    assert texts == {0: cut} and reasons == {0: "stop"}


def test_n_choices_and_their_usage(client):
    sampled = chat(client, n=3, temperature=1.0, seed=7, max_tokens=8)
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    assert len({c.message.content for c in sampled.choices}) > 1  # each choice has its own random stream
    single = chat(client, max_tokens=8)
    greedy = chat(client, n=2, max_tokens=8)
    assert [c.message.content for c in greedy.choices] == [single.choices[0].message.content] * 2
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert greedy.usage.completion_tokens == 2 * single.usage.completion_tokens
    texts, _, usage = streamed_text(chat(client, n=2, max_tokens=8, stream=True,
                                         stream_options={"include_usage": True}))
    assert texts == {0: greedy.choices[0].message.content, 1: greedy.choices[1].message.content}
    assert usage.completion_tokens == greedy.usage.completion_tokens


def test_concurrent_clients_are_batched_and_get_their_sequential_answers(server, client):
    conversations = [[{"role": "user", "content": f"Convert March {i + 1}, 2021 " + "please " * (i % 4)}]
                     for i in range(16)]
    sequential = [chat(client, messages=m).choices[0].message.content for m in conversations]
    engine = served(server).engine
    calls = engine.generate_calls
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda m: chat(client, messages=m).choices[0].message.content, conversations))
    assert concurrent == sequential
    assert engine.generate_calls - calls < len(conversations)
