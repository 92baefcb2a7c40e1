"""``POST /predict`` for a declarative LLM: the records are checked on a worker thread, predicted on the model's
thread between batches (holding the tokenizer's lock), and bounded by the queue and the request timeout."""

from __future__ import annotations

import asyncio
import time

from hfbridge.declarative.server import PredictRequestError, predict_records
from hfbridge.serving.errors import APIError


async def predict_response(served, body: dict) -> dict:
    llm = served.served.llm
    if llm is None:
        raise APIError(404, "/predict needs a declarative LLM (a run folder of hfbridge train, or --config); this "
                            "server has a plain model: use /v1/completions or /v1/chat/completions")
    try:
        records = await served.in_pool(predict_records, llm, body, served.settings.max_records)
    except PredictRequestError as e:
        raise APIError(e.status, str(e)) from None
    deadline = time.monotonic() + served.settings.request_timeout

    def run() -> list[dict]:
        with served.engine.lock:
            return llm.predict(records)

    future = served.batcher.submit_job(run, deadline)
    try:
        predictions = await asyncio.wait_for(asyncio.wrap_future(future), deadline - time.monotonic())
    except asyncio.TimeoutError:
        future.cancel()
        raise APIError(504, "the request did not finish within the server's request timeout", code="timeout") from None
    except asyncio.CancelledError:
        if not future.cancelled():  # this request was cancelled, not its job
            raise
        if time.monotonic() > deadline:  # skipped: it waited past its deadline
            raise APIError(504, "the request did not start within the server's request timeout", code="timeout") from None
        raise APIError(503, "the server is shutting down", code="shutting_down") from None
    return {"model": served.model_id, "predictions": predictions}
