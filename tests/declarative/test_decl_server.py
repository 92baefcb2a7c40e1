"""``hfbridge serve`` of a declarative run folder: ``/predict`` beside the OpenAI endpoints, on an ephemeral
localhost port, spoken to with a real HTTP client (urllib)."""

import json
import urllib.error
import urllib.request

import pytest
from decl_helpers import LABELS, make_config, review_rows

from hfbridge.declarative import LLM
from hfbridge.serving import ServeSettings, open_served_model, start_server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("decl-run")
    LLM(make_config(tiny_model_dir, "category"), random_seed=0, device="cpu").save(run / "model")
    served = open_served_model(str(run), device="cpu", model_id="tiny")  # the run folder, as `serve --model`
    server = start_server(served, ServeSettings(max_body_bytes=4096, max_records=4, max_new_tokens=8))
    yield server
    server.stop()


def _call(server, path, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(server.url + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_models(server):
    assert server.url.startswith("http://127.0.0.1:")
    assert _call(server, "/health") == (200, {"status": "ok", "model": "tiny"})
    status, body = _call(server, "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "tiny"


def test_predict_returns_a_label_and_every_probability(server):
    status, body = _call(server, "/predict", {"records": review_rows(3)})
    assert status == 200 and len(body["predictions"]) == 3
    row = body["predictions"][0]
    assert row["sentiment_predictions"] in LABELS
    assert sum(row[f"sentiment_probabilities_{label}"] for label in LABELS) == pytest.approx(1.0)
    expected = server.app.state.served.served.llm.predict(review_rows(3))
    assert [r["sentiment_predictions"] for r in body["predictions"]] == [r["sentiment_predictions"] for r in expected]
    status, body = _call(server, "/predict", {"review": "it was fine"})  # one record
    assert status == 200 and len(body["predictions"]) == 1
    status, body = _call(server, "/predict", review_rows(2))  # a list of records
    assert status == 200 and len(body["predictions"]) == 2


def test_openai_compatible_chat_completions(server):
    status, body = _call(server, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 4 and usage["total_tokens"] == usage["prompt_tokens"] + usage[
        "completion_tokens"]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/predict", {"records": [{"text": "no review column"}]}, 400, "column 'review' is named in input_features"),
        ("/predict", {"records": review_rows(5)}, 413, "the limit is 4"),
        ("/predict", [1, 2], 400, "expected"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 99}, 400,
         "above this server's limit of 8"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
        ("/nothing", {}, 404, "no endpoint POST /nothing"),
        ("/predict", {"records": [{"review": "x" * 5000}]}, 413, "the limit is 4096"),
    ],
)
def test_bad_requests_get_clear_errors(server, path, body, status, message):
    got, payload = _call(server, path, body)
    assert got == status and message in payload["error"]["message"]


def test_a_body_that_is_not_json_is_a_400(server):
    status, payload = _call(server, "/predict", raw=b"{not json")
    assert status == 400 and "not valid JSON" in payload["error"]["message"]


def test_a_config_alone_serves_its_base_model_with_predict(tiny_model_dir, tmp_path):
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(make_config(tiny_model_dir, "category")))
    served = open_served_model(config=str(config), device="cpu")
    assert served.llm is not None and served.model_id == served.llm.model_name
    with start_server(served) as server:
        status, body = _call(server, "/predict", {"records": review_rows(1)})
    assert status == 200 and body["predictions"][0]["sentiment_predictions"] in LABELS
