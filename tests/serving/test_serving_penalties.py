"""``presence_penalty``, ``frequency_penalty`` and ``logit_bias``: greedy answers equal a loop written from OpenAI's
definition over the model's own forward (no KV cache), the same on the fast loop and through ``model.generate``,
and bad values are a 400."""

import pytest
import torch
from serve_helpers import post, served

from hfbridge.serving.engine import Row

PROMPT = [5, 17, 42, 9, 77, 3, 120, 64]


def by_definition(model, prompt, steps, presence=0.0, frequency=0.0, bias=None):
    """Greedy tokens: each step's last logits minus ``frequency * count + presence * (count > 0)`` over the
    tokens generated so far, plus ``bias``."""
    ids, new = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        for token, value in (bias or {}).items():
            logits[token] += value
        for token in set(new):
            logits[token] -= frequency * new.count(token) + presence
        new.append(int(logits.argmax()))
        ids.append(new[-1])
    return new


@pytest.mark.parametrize("presence, frequency", [(0.0, 1.5), (1.0, 0.0), (0.5, -0.5)])
def test_penalties_follow_openais_definition_on_both_paths(server, presence, frequency):
    engine = served(server).engine
    expected = by_definition(engine.model, PROMPT, 12, presence, frequency)
    status, body = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                                    "presence_penalty": presence, "frequency_penalty": frequency})
    assert status == 200, body
    assert body["choices"][0]["text"] == engine.decode(expected)
    rows = []
    for fast in (True, False):
        row = Row(PROMPT, 12, presence_penalty=presence, frequency_penalty=frequency)
        engine.fast_greedy = fast
        try:
            engine.run([row])
        finally:
            engine.fast_greedy = True
        rows.append(row.tokens)
    assert rows[0] == rows[1] == expected
    assert expected != by_definition(engine.model, PROMPT, 12)  # the penalties did change the answer


def test_logit_bias_forces_and_forbids_tokens(server):
    engine = served(server).engine
    plain = by_definition(engine.model, PROMPT, 6)
    status, body = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                                    "logit_bias": {"33": 100}, "logprobs": 0})
    assert status == 200 and body["choices"][0]["text"] == engine.decode([33] * 6)
    # log-probabilities stay the model's own, before the bias
    assert body["choices"][0]["logprobs"]["token_logprobs"][0] < -1
    banned = {str(t): -100 for t in set(plain)}
    status, body = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                                    "logit_bias": banned})
    expected = by_definition(engine.model, PROMPT, 6, bias={int(t): -100.0 for t in banned})
    assert status == 200 and body["choices"][0]["text"] == engine.decode(expected)
    assert not set(expected) & set(plain)


@pytest.mark.parametrize("payload, message", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"a": 1}}, "token ids"),
    ({"logit_bias": {"5": 101}}, "[-100, 100]"),
    ({"logit_bias": {"99999999": 1}}, "must lie in"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
])
def test_bad_penalties_and_biases_are_400(server, payload, message):
    status, body = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, **payload})
    assert status == 400 and message in body["error"]["message"], body
