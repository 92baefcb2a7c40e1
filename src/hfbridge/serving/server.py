"""Running the app: checks made before the model loads, the listening socket, and uvicorn.

Before any weights load, ``hfbridge serve`` refuses a host other than loopback without an API key, and binds its
port, so that a port in use, a port out of range or a host this machine cannot bind (``::1`` with IPv6 off) is
an error at once (exit status 2). uvicorn then serves on that very socket.

uvicorn's HTTP/1.1 protocol gets two bounds it lacks: a connection must send its request line and headers within
``read_timeout`` seconds (a client dripping a byte at a time is closed; the body has the same limit in the app),
and past ``max_connections`` open connections a new one gets a 503 and is closed.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from hfbridge.serving.app import ServeSettings, build_app

log = logging.getLogger(__name__)

API_KEY_ENV = "HFBRIDGE_API_KEY"


def _addresses(host: str, port: int) -> list[tuple]:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve the host {host!r} ({e.strerror})") from None


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback one (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    addresses = [info[4][0] for info in _addresses(host, 0)]
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is out of range; use 1 to 65535 (or 0 for any free port)")


def check_exposure(host: str, api_key: str | None) -> None:
    """Anything but loopback is reachable from other machines: refuse it without an API key."""
    if not api_key and not is_loopback(host):
        raise ValueError(f"--host {host} is reachable from other machines, and the server has no API key: set one "
                         f"with --api-key or the {API_KEY_ENV} environment variable (clients then send "
                         "'Authorization: Bearer <key>'), or bind 127.0.0.1")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening), or an ``OSError`` that says what to do."""
    check_port(port)
    error: OSError | None = None
    infos = sorted(_addresses(host, port), key=lambda info: info[0] != socket.AF_INET)  # localhost: 127.0.0.1
    for family, kind, proto, _, address in infos:
        sock = None
        try:
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            return sock
        except OSError as e:
            if sock is not None:
                sock.close()
            error = e
    where = f"{host}:{port}"
    if error is not None and error.errno == errno.EADDRINUSE:
        raise OSError(f"cannot listen on {where}: the port is in use (another server?); choose another --port")
    if error is not None and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        raise OSError(f"cannot listen on {where}: this machine has no such address (for ::1, is IPv6 off?); "
                      "choose another --host")
    if error is not None and error.errno == errno.EACCES:
        raise OSError(f"cannot listen on {where}: permission denied (ports below 1024 need privileges)")
    raise OSError(f"cannot listen on {where}: {error}")


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _busy_response() -> bytes:
    body = json.dumps({"error": {"message": "too many open connections; retry later", "type": "server_error",
                                 "param": None, "code": "server_busy"}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def protocol_class(read_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for the request head and a cap on open connections."""

    class BoundedH11Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_busy_response())
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(read_timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # the request head did not arrive in time

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return BoundedH11Protocol


def uvicorn_config(app, settings: ServeSettings, **kwargs) -> uvicorn.Config:
    return uvicorn.Config(app, http=protocol_class(settings.read_timeout, settings.max_connections), lifespan="on",
                          log_config=None, timeout_keep_alive=5, timeout_graceful_shutdown=5, **kwargs)


class BackgroundServer:
    """The app served by uvicorn in a thread (tests, benchmarks, notebooks); ``stop()`` shuts it down."""

    def __init__(self, app, sock: socket.socket, settings: ServeSettings):
        self.server = uvicorn.Server(uvicorn_config(app, settings, access_log=False, log_level="warning"))
        self.sock = sock
        self.url = url_of(sock)
        self.app = app
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="hfbridge-serve",
                                        daemon=True)

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        until = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > until:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(served_model, settings: ServeSettings | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> BackgroundServer:
    """Serve ``served_model`` (a :class:`~hfbridge.serving.model.ServedModel`) in a background thread."""
    settings = settings or ServeSettings()
    check_exposure(host, settings.api_key)
    return BackgroundServer(build_app(served_model, settings), bind(host, port), settings).start()


def serve(model: str | None, config: str | None, settings: ServeSettings, *, host: str = "127.0.0.1",
          port: int = 8000, device: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
          model_id: str | None = None) -> int:
    """``hfbridge serve``: check the host and bind the port, then load the model, then serve until Ctrl-C."""
    from hfbridge.console import say
    from hfbridge.serving import model as models

    check_exposure(host, settings.api_key)
    sock = bind(host, port)
    try:
        served_model = models.open_served_model(model, config, device=device, dtype=dtype,
                                                trust_remote_code=trust_remote_code, model_id=model_id)
        app = build_app(served_model, settings)
        say(f"serving {served_model.model_id!r} on {url_of(sock)} (POST /v1/chat/completions, /v1/completions"
            f"{', /predict' if served_model.llm is not None else ''}; GET /v1/models, /health); Ctrl-C stops")
        try:
            uvicorn.Server(uvicorn_config(app, settings)).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shut down gracefully, then raises the Ctrl-C again
            pass
    finally:
        sock.close()
    return 0
