"""``hfbridge serve``: any model hfbridge loads, behind OpenAI-compatible endpoints, with concurrent requests
decoded together.

    schemas   the request bodies and their checks (every malformed request is a 4xx in OpenAI's error shape)
    engine    rows (one choice each) decoded as a batch by hfbridge's one decoding loop: per-row sampling, stops,
              streaming, cancellation and deadlines
    batcher   the model's one thread: requests arriving within a short window become one batch
    app       the FastAPI app: endpoints, API key, body limits, server-sent events
    model     what ``--model`` names, loaded for serving
    server    checks before loading, the socket, uvicorn

Names are imported on first use (FastAPI and uvicorn load only when serving).
"""

from __future__ import annotations

from hfbridge._shared import lazy_exports

_EXPORTS = {
    "ServeSettings": "hfbridge.serving.app",
    "build_app": "hfbridge.serving.app",
    "ServedModel": "hfbridge.serving.model",
    "open_served_model": "hfbridge.serving.model",
    "BackgroundServer": "hfbridge.serving.server",
    "start_server": "hfbridge.serving.server",
    "serve": "hfbridge.serving.server",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
