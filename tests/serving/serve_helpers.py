"""Helpers of the server tests (fixtures in conftest.py): the tiny model served, plain HTTP requests, slow decoding."""

import http.client
import json
import time
from urllib.parse import urlparse

import openai
from transformers.generation.streamers import BaseStreamer

from hfbridge.models.loading import load_for_inference
from hfbridge.serving import ServedModel

MODEL_ID = "tiny"


def served_tiny(model_dir) -> ServedModel:
    model, tokenizer = load_for_inference(model_dir)
    return ServedModel(model, tokenizer, MODEL_ID)


def client_for(server, api_key: str = "unused", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)


def served(server):
    """The server's shared state (engine, batcher, settings)."""
    return server.app.state.served


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
        timeout: float = 30) -> tuple[int, dict]:
    """One plain HTTP request; the status and the JSON body (a stream: its text)."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        if response.getheader("content-type", "").startswith(("text/event-stream", "text/plain")):
            return response.status, data.decode()
        return response.status, json.loads(data or b"null")
    finally:
        conn.close()


def post(server, path: str, payload, **kwargs) -> tuple[int, dict]:
    return raw(server, "POST", path, json.dumps(payload).encode(), **kwargs)


class SlowSteps(BaseStreamer):
    """A streamer that makes each decoding step take ``seconds`` (for deadline and disconnect tests)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def put(self, value):
        time.sleep(self.seconds)

    def end(self):
        pass


def slow_down(server, seconds: float = 0.005):
    """Every step of ``server``'s decoding takes ``seconds`` and no row ends early at an end-of-sequence token."""
    engine = served(server).engine
    engine.generate_kwargs = {"streamer": SlowSteps(seconds), "suppress_tokens": sorted(engine.stops)}
