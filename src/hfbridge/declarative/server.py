"""``hfbridge serve``: an HTTP server for a declarative LLM, on localhost unless told otherwise.

Endpoints:

* ``GET /health``: ``{"status": "ok", "model": ...}``
* ``POST /predict``: ``{"records": [{column: value, ...}, ...]}`` (or one record) -> ``{"predictions": [...]}``,
  the rows ``LLM.predict`` gives (a category output adds each label's probability);
* ``POST /v1/chat/completions``: OpenAI-compatible chat completion (``messages``, ``max_tokens`` or
  ``max_completion_tokens``, ``temperature``, ``top_p``, ``stop`` ignored; ``n`` must be 1, no streaming);
* ``GET /v1/models``: the one model.

Requests are bounded (body size, records per request, new tokens) and run one at a time on the model (a lock);
the standard library's ``ThreadingHTTPServer`` serves the connections.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hfbridge.declarative.dataset import DatasetError, check_rows
from hfbridge.declarative.llm import LLM
from hfbridge.generation import generate_ids, prompt_ids

log = logging.getLogger(__name__)


class RequestError(ValueError):
    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass
class ServerLimits:
    max_body_bytes: int = 1 << 20
    max_records: int = 256
    max_new_tokens: int = 512
    read_timeout_s: float = 30.0


class LLMService:
    """What the endpoints do, without HTTP: validate a request body and run the model (one request at a time)."""

    def __init__(self, llm: LLM, model_id: str, limits: ServerLimits | None = None):
        self.llm = llm
        self.model_id = model_id
        self.limits = limits or ServerLimits()
        self.lock = threading.Lock()

    def predict(self, body) -> dict:
        records = body.get("records", body.get("inputs")) if isinstance(body, dict) else body
        if isinstance(body, dict) and records is None:
            records = [body]
        if isinstance(records, dict):
            records = [records]
        if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
            raise RequestError("expected {\"records\": [{column: value, ...}, ...]} or one record object")
        if len(records) > self.limits.max_records:
            raise RequestError(f"{len(records)} records in one request; the limit is {self.limits.max_records}",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            check_rows([(f"records[{i}]", r) for i, r in enumerate(records)], self.llm.config_obj,
                       need_target=False)
        except DatasetError as e:
            raise RequestError(str(e)) from None
        with self.lock:
            predictions = self.llm.predict(records)
        return {"model": self.model_id, "predictions": predictions}

    def _messages(self, body: dict) -> list[dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {role, content} objects")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(f"messages[{i}]: needs a role of system, user or assistant")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise RequestError(f"messages[{i}].content must be a string")
            clean.append({"role": m["role"], "content": content})
        return clean

    def _generation_kwargs(self, body: dict) -> tuple[int, dict]:
        if body.get("n", 1) != 1:
            raise RequestError("only n=1 is supported")
        if body.get("stream"):
            raise RequestError("streaming is not supported; send stream: false")
        default = min(self.llm.max_new_tokens, self.limits.max_new_tokens)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError("max_tokens must be a positive integer")
        if max_tokens > self.limits.max_new_tokens:
            raise RequestError(f"max_tokens={max_tokens} is above this server's limit of {self.limits.max_new_tokens}")
        kwargs = dict(self.llm.generation)
        temperature = body.get("temperature")
        if temperature is not None:
            if not isinstance(temperature, (int, float)) or temperature < 0:
                raise RequestError("temperature must be a number >= 0")
            kwargs.update({"do_sample": True, "temperature": float(temperature)} if temperature > 0
                          else {"do_sample": False})
        if body.get("top_p") is not None and kwargs.get("do_sample"):
            kwargs["top_p"] = float(body["top_p"])
        return max_tokens, kwargs

    def chat_completion(self, body) -> dict:
        if not isinstance(body, dict):
            raise RequestError("expected a JSON object")
        messages = self._messages(body)
        max_tokens, kwargs = self._generation_kwargs(body)
        tokenizer = self.llm.tokenizer
        if getattr(tokenizer, "chat_template", None):
            prompt = messages
        else:  # a model without a chat template gets the turns as plain text
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        with self.lock:
            n_prompt = len(prompt_ids(tokenizer, prompt))
            ids = generate_ids(self.llm.model, tokenizer, [prompt], max_new_tokens=max_tokens, batch_size=1,
                               max_input_length=self.llm.max_input_length, **kwargs)[0]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length" if len(ids) >= max_tokens else "stop"}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(ids),
                      "total_tokens": n_prompt + len(ids)},
        }


def _handler(service: LLMService):
    class Handler(BaseHTTPRequestHandler):
        server_version = "hfbridge"
        protocol_version = "HTTP/1.1"
        timeout = service.limits.read_timeout_s

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            log.info("%s %s", self.address_string(), format % args)

        def _send(self, status: HTTPStatus, payload: dict) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: HTTPStatus, message: str) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._send(status, {"error": {"message": message, "type": kind, "code": int(status)}})

        def _body(self):
            length = self.headers.get("Content-Length")
            if length is None:
                raise RequestError("a Content-Length header is required", HTTPStatus.LENGTH_REQUIRED)
            try:
                size = int(length)
            except ValueError:
                raise RequestError("bad Content-Length") from None
            if size < 0 or size > service.limits.max_body_bytes:
                self.close_connection = True
                raise RequestError(f"the body is {size} bytes; the limit is {service.limits.max_body_bytes}",
                                   HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            try:
                return json.loads(self.rfile.read(size) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"the body is not valid JSON: {e}") from None

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path == "/health":
                self._send(HTTPStatus.OK, {"status": "ok", "model": service.model_id})
            elif self.path == "/v1/models":
                self._send(HTTPStatus.OK, {"object": "list", "data": [
                    {"id": service.model_id, "object": "model", "owned_by": "hfbridge"}]})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no endpoint {self.path}")

        def do_POST(self):  # noqa: N802
            routes = {"/predict": service.predict, "/v1/chat/completions": service.chat_completion}
            route = routes.get(self.path)
            try:
                if route is None:
                    raise RequestError(f"no endpoint {self.path}", HTTPStatus.NOT_FOUND)
                self._send(HTTPStatus.OK, route(self._body()))
            except RequestError as e:
                self._error(e.status, str(e))
            except Exception as e:  # the model failed: report it, keep serving
                log.exception("request to %s failed", self.path)
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")

    return Handler


class LLMServer:
    """``ThreadingHTTPServer`` around an :class:`LLMService`; ``port=0`` picks a free port."""

    def __init__(self, llm: LLM, host: str = "127.0.0.1", port: int = 8000, model_id: str | None = None,
                 limits: ServerLimits | None = None):
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("serving on %s: reachable from other machines; there is no authentication", host)
        self.service = LLMService(llm, model_id or llm.model_name, limits)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self.service))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LLMServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hfbridge-serve", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
