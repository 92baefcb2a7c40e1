"""``GET /metrics``: the server's counters in Prometheus' text format (version 0.0.4), for a scraper or a look.

* ``hfbridge_requests_total{endpoint, status}`` and ``hfbridge_request_duration_seconds{endpoint}`` (a histogram,
  from the request's arrival to the last byte of its answer, streams included), counted by a plain ASGI middleware
  (it does not touch the request's body or its disconnect messages); an endpoint the server does not have is
  counted as ``other``, so the labels stay few;
* ``hfbridge_prompt_tokens_total`` and ``hfbridge_generation_tokens_total``: the usage of every answered
  completion request, the numbers its ``usage`` reports;
* from the batcher: ``hfbridge_batches_total``, ``hfbridge_rows_total``, ``hfbridge_rows_joined_total`` (rows that
  joined a batch already decoding) and the gauge ``hfbridge_queue_requests`` (requests waiting for the model).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/predict",
             "/tokenizer_info", "/tokenize", "/detokenize")


class Metrics:
    """Counters shared by the event loop, the worker threads and the scraper (under one lock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.durations: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.duration_sum: dict[str, float] = defaultdict(float)
        self.duration_count: dict[str, int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        with self._lock:
            self.requests[(endpoint, status)] += 1
            buckets = self.durations[endpoint]
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self.duration_sum[endpoint] += seconds
            self.duration_count[endpoint] += 1

    def add_usage(self, usage: dict) -> None:
        with self._lock:
            self.prompt_tokens += usage["prompt_tokens"]
            self.generation_tokens += usage["completion_tokens"]

    def render(self, batcher) -> str:
        with self._lock:
            lines = ["# HELP hfbridge_requests_total HTTP requests answered, by endpoint and status.",
                     "# TYPE hfbridge_requests_total counter"]
            lines += [f'hfbridge_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP hfbridge_request_duration_seconds From a request's arrival to its answer's last byte.",
                      "# TYPE hfbridge_request_duration_seconds histogram"]
            for endpoint in sorted(self.durations):
                for bound, count in zip(BUCKETS, self.durations[endpoint]):
                    lines.append(f'hfbridge_request_duration_seconds_bucket{{endpoint="{endpoint}",le="{bound}"}} '
                                 f"{count}")
                total = self.duration_count[endpoint]
                lines += [f'hfbridge_request_duration_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}} {total}',
                          f'hfbridge_request_duration_seconds_sum{{endpoint="{endpoint}"}} '
                          f"{self.duration_sum[endpoint]:.6f}",
                          f'hfbridge_request_duration_seconds_count{{endpoint="{endpoint}"}} {total}']
            counters = [("prompt_tokens_total", "Prompt tokens of answered completion requests.", self.prompt_tokens),
                        ("generation_tokens_total", "Tokens generated for answered completion requests.",
                         self.generation_tokens)]
        counters += [("batches_total", "Decoding batches run.", batcher.batches),
                     ("rows_total", "Rows (choices) decoded.", batcher.rows_done),
                     ("rows_joined_total", "Rows that joined a batch already decoding.", batcher.rows_joined)]
        for name, text, value in counters:
            lines += [f"# HELP hfbridge_{name} {text}", f"# TYPE hfbridge_{name} counter", f"hfbridge_{name} {value}"]
        lines += ["# HELP hfbridge_queue_requests Requests waiting for the model.",
                  "# TYPE hfbridge_queue_requests gauge", f"hfbridge_queue_requests {batcher.waiting}"]
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Counts every HTTP request's endpoint, status and duration into ``metrics`` (plain ASGI: the request's
    messages pass through untouched)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.observe(scope.get("path", ""), status[0], time.monotonic() - start)
