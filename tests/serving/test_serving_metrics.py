"""``GET /metrics``: request counts by endpoint and status, durations as a histogram, the token counters equal to
the usage the answers reported, the batcher's counters, and the API key asked for like any other endpoint."""

import re
import time

from serve_helpers import client_for, post, raw, served

MODEL = "tiny"


def scrape(server) -> dict[str, float]:
    status, text = raw(server, "GET", "/metrics")
    assert status == 200
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_requests_tokens_and_batches(make_server):
    server = make_server(max_new_tokens=16)
    usage = []
    for tokens in (4, 5, 6):
        status, body = post(server, "/v1/completions", {"prompt": [5, 17, 42, 9], "max_tokens": tokens})
        assert status == 200
        usage.append(body["usage"])
    with client_for(server) as client:
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3, stream=True, stream_options={"include_usage": True})
        usage += [chunk.usage.model_dump() for chunk in stream if chunk.usage]
    assert post(server, "/v1/completions", {"prompt": []})[0] == 400
    assert post(server, "/nowhere", {})[0] == 404
    for _ in range(50):  # a request is counted once its answer's last byte is sent: the client may see it first
        metrics = scrape(server)
        if 'hfbridge_requests_total{endpoint="other",status="404"}' in metrics:
            break
        time.sleep(0.02)
    assert metrics['hfbridge_requests_total{endpoint="/v1/completions",status="200"}'] == 3
    assert metrics['hfbridge_requests_total{endpoint="/v1/completions",status="400"}'] == 1
    assert metrics['hfbridge_requests_total{endpoint="/v1/chat/completions",status="200"}'] == 1
    assert metrics['hfbridge_requests_total{endpoint="other",status="404"}'] == 1
    assert metrics["hfbridge_generation_tokens_total"] == sum(u["completion_tokens"] for u in usage) == 18
    assert metrics["hfbridge_prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usage)
    batcher = served(server).batcher
    assert metrics["hfbridge_batches_total"] == batcher.batches == 4
    assert metrics["hfbridge_rows_total"] == 4 and metrics["hfbridge_queue_requests"] == 0
    assert metrics["hfbridge_rows_joined_total"] == batcher.rows_joined
    histogram = sorted((float(re.search(r'le="([^"]+)"', k).group(1)), v) for k, v in metrics.items()
                       if k.startswith('hfbridge_request_duration_seconds_bucket{endpoint="/v1/completions"'))
    counts = [v for _, v in histogram]
    assert counts == sorted(counts) and counts[-1] == 4  # cumulative; +Inf holds all four
    assert metrics['hfbridge_request_duration_seconds_count{endpoint="/v1/completions"}'] == 4
    assert scrape(server)['hfbridge_requests_total{endpoint="/metrics",status="200"}'] >= 1  # the scrapes before


def test_metrics_need_the_api_key(make_server):
    server = make_server(api_key="secret")
    assert raw(server, "GET", "/metrics")[0] == 401
    status, text = raw(server, "GET", "/metrics", headers={"Authorization": "Bearer secret"})
    assert status == 200 and "hfbridge_requests_total" in text
