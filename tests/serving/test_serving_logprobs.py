"""Log-probabilities from the server: chat ``logprobs``/``top_logprobs`` and completions ``logprobs`` with
``echo``, each checked against the model's own forward over prompt and answer (an independent path: one full
forward, no KV cache), and lm-evaluation-harness's ``local-completions`` model pointed at the server scoring a
multiple-choice task with the log-likelihoods, and accuracy, of lm-eval's in-process ``hf`` model: with the
model's tokenizer given to lm-eval, and with the server's own (``/tokenizer_info``, ``/tokenize``,
``/detokenize``, which these tests also check against the tokenizer)."""

import json
import math

import pytest
import torch
from serve_helpers import MODEL_ID, post, served

from hfbridge.generation import prompt_ids

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the date today?"}]


def reference_logprobs(server, ids: list[int]) -> torch.Tensor:
    """``[len(ids) - 1, vocab]``: the log-probabilities of each next token, from one forward over ``ids``."""
    model = served(server).engine.model
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def test_chat_logprobs_are_the_models_and_top_logprobs_rank_them(server, client):
    reply = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8
    engine = served(server).engine
    prompt = prompt_ids(engine.tokenizer, CHAT)
    with torch.no_grad():  # the greedy tokens from transformers' own generate
        out = engine.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                    pad_token_id=0, temperature=None, top_p=None, top_k=None)
    ids = out[0].tolist()
    assert [t.token for t in content] == engine.token_texts(ids[len(prompt):])
    expected = reference_logprobs(server, ids)[len(prompt) - 1:]
    for position, entry in enumerate(content):
        token = ids[len(prompt) + position]
        assert entry.logprob == pytest.approx(float(expected[position, token]), abs=1e-4)
        tops = entry.top_logprobs
        assert len(tops) == 3 and [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert tops[0].token == entry.token and tops[0].logprob == entry.logprob  # greedy: the chosen is the top
        values, _ = expected[position].topk(3)
        assert [t.logprob for t in tops] == pytest.approx(values.tolist(), abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def _token_ids(engine, text: str) -> list[int]:
    """The ids whose own text is ``text`` (several for bytes that are not a whole character)."""
    texts = engine.token_texts(range(engine.vocab_size))
    return [i for i, t in enumerate(texts) if t == text]


@pytest.mark.parametrize("stop", [None, "e"])
def test_streamed_logprobs_add_up_to_the_whole_answers(server, client, stop):
    """Each streamed chunk carries the log-probabilities of the tokens its text completes; together they are the
    whole answer's (chat and completions, also when a stop string cuts the text)."""
    kwargs = {"max_tokens": 10, "temperature": 0, "stop": stop}
    whole = client.chat.completions.create(model=MODEL_ID, messages=CHAT, logprobs=True, top_logprobs=2, **kwargs)
    pieces, text = [], ""
    for chunk in client.chat.completions.create(model=MODEL_ID, messages=CHAT, logprobs=True, top_logprobs=2,
                                                stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                pieces += choice.logprobs.content or []
    assert text == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == ("stop" if stop else "length")
    assert [(p.token, p.logprob, [t.logprob for t in p.top_logprobs]) for p in pieces] == \
        [(p.token, p.logprob, [t.logprob for t in p.top_logprobs]) for p in whole.choices[0].logprobs.content]

    for echo in (False, True):  # with echo the prompt (and its log-probabilities) comes first
        body = {"prompt": [5, 17, 42, 9], "max_tokens": 10, "temperature": 0, "logprobs": 1, "stop": stop,
                "echo": echo}
        status, plain = post(server, "/v1/completions", body)
        status, streamed = post(server, "/v1/completions", {**body, "stream": True})
        assert status == 200
        merged, text = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}, ""
        for line in streamed.splitlines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                for key in merged if choice["logprobs"] else ():
                    merged[key] += choice["logprobs"][key]
        assert merged == plain["choices"][0]["logprobs"] and text == plain["choices"][0]["text"]
        assert (merged["token_logprobs"][0] is None) == echo


def test_completion_echo_gives_every_prompt_token_its_logprob(server):
    prompt = [5, 17, 42, 9, 77, 3, 120, 64]
    status, body = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0,
                                                    "logprobs": 2, "echo": True})
    assert status == 200, body
    logprobs, engine = body["choices"][0]["logprobs"], served(server).engine
    assert len(logprobs["tokens"]) == len(prompt) + 2 == len(logprobs["token_logprobs"])
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["tokens"][: len(prompt)] == engine.token_texts(prompt)
    expected = reference_logprobs(server, prompt)
    for i in range(1, len(prompt)):
        assert logprobs["token_logprobs"][i] == pytest.approx(float(expected[i - 1, prompt[i]]), abs=1e-5)
        top = logprobs["top_logprobs"][i]
        assert len(top) <= 2 and max(top.values()) == pytest.approx(float(expected[i - 1].max()), abs=1e-5)
    assert body["choices"][0]["text"].startswith(engine.decode(prompt))
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    # without echo: the answer's tokens alone, the same log-probabilities as with it
    status, plain = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0,
                                                     "logprobs": 0})
    assert status == 200
    assert plain["choices"][0]["logprobs"]["token_logprobs"] == logprobs["token_logprobs"][len(prompt):]
    assert plain["choices"][0]["logprobs"]["top_logprobs"] == [{}, {}]
    assert all(math.isfinite(v) for v in logprobs["token_logprobs"][1:])


def test_sampled_rows_report_the_models_distribution(server):
    prompt = [5, 17, 42, 9]
    status, body = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 1.5,
                                                    "seed": 7, "logprobs": 1, "echo": True})
    assert status == 200, body
    logprobs, engine = body["choices"][0]["logprobs"], served(server).engine
    candidates = [_token_ids(engine, t) for t in logprobs["tokens"][len(prompt):]]
    assert all(candidates)
    ids = list(prompt)
    for k, options in enumerate(candidates):  # before temperature: the raw model's log-probability of the draw
        expected = reference_logprobs(server, ids + [options[0]])[-1]
        got = logprobs["token_logprobs"][len(prompt) + k]
        token = min(options, key=lambda i: abs(float(expected[i]) - got))
        assert got == pytest.approx(float(expected[token]), abs=1e-4)
        ids.append(token)


def test_tokenize_and_detokenize_are_the_tokenizers(server):
    engine = served(server).engine
    tokenizer = engine.tokenizer
    text = "Date: May 1, 1999\nISO: 1999-05-01"
    for special in (True, False):
        status, body = post(server, "/tokenize", {"prompt": text, "add_special_tokens": special})
        assert status == 200 and body["tokens"] == tokenizer(text, add_special_tokens=special)["input_ids"]
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == engine.context
    status, body = post(server, "/tokenize", {"messages": CHAT})
    assert status == 200 and body["tokens"] == prompt_ids(tokenizer, CHAT)  # as the chat endpoint renders it
    status, back = post(server, "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == tokenizer.decode(body["tokens"])
    status, info = raw_get(server, "/tokenizer_info")
    assert status == 200 and info["eos_token"] == tokenizer.eos_token and info["chat_template"]
    for path, payload, message in [("/tokenize", {}, "either prompt"), ("/tokenize", {"prompt": "a", "messages": CHAT},
                                   "either prompt"), ("/detokenize", {"tokens": [10**7]}, "must lie in"),
                                   ("/detokenize", {"tokens": "a"}, "tokens"),
                                   ("/tokenize", {"prompt": "a", "model": "other"}, "not served here")]:
        status, body = post(server, path, payload)
        assert status in (400, 404) and message in body["error"]["message"], (path, payload, body)


def raw_get(server, path):
    from serve_helpers import raw

    return raw(server, "GET", path)


@pytest.mark.parametrize("tokenizer", ["local", "remote"])
def test_lm_eval_local_completions_against_the_server_matches_lm_eval_in_process(server, tiny_model_dir, tokenizer):
    """lm-eval's OpenAI-compatible ``local-completions`` model (echo + logprobs, what it sends for
    log-likelihood) through the server gives each choice's log-likelihood and is-greedy flag, and the accuracy,
    that lm-eval's ``hf`` model gives in the same process."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")
    from lm_eval.tasks import TaskManager

    from hfbridge.harness import bundled

    manager = TaskManager(include_path=str(bundled.TASKS_DIR), include_defaults=False)
    common = {"tasks": ["hfbridge_dates_mc"], "task_manager": manager, "limit": 5, "log_samples": True}
    through = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={server.url}/v1/completions,model={MODEL_ID},tokenized_requests=True,"
                   "num_concurrent=1,max_retries=1," + (f"tokenizer={tiny_model_dir},tokenizer_backend=huggingface"
                                                         if tokenizer == "local" else "tokenizer_backend=remote"),
        **common)
    direct = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32",
                                     batch_size=1, device="cpu", **common)
    a, b = through["samples"]["hfbridge_dates_mc"], direct["samples"]["hfbridge_dates_mc"]
    assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] == list(range(5))
    for x, y in zip(a, b):
        assert [r[0] for r in x["filtered_resps"]] == pytest.approx([r[0] for r in y["filtered_resps"]], abs=1e-4)
        assert [r[1] for r in x["filtered_resps"]] == [r[1] for r in y["filtered_resps"]]
    diff = max(abs(r[0] - q[0]) for x, y in zip(a, b) for r, q in zip(x["filtered_resps"], y["filtered_resps"]))
    print(f"lm-eval local-completions ({tokenizer} tokenizer) through the server against lm-eval's hf model: {len(a)} questions x 4 "
          f"choices, max log-likelihood difference {diff:.1e}, acc {through['results']['hfbridge_dates_mc']['acc,none']}"
          f" against {direct['results']['hfbridge_dates_mc']['acc,none']}")
    assert through["results"]["hfbridge_dates_mc"]["acc,none"] == direct["results"]["hfbridge_dates_mc"]["acc,none"]
