"""Fixtures for the server tests: the tiny random Llama of tests/conftest.py served on 127.0.0.1 (an ephemeral
port), spoken to with the official ``openai`` client or raw HTTP (helpers in serve_helpers.py)."""

import pytest
from serve_helpers import client_for, served_tiny

from hfbridge.serving import ServeSettings, start_server


@pytest.fixture(scope="module")
def make_server(tiny_model_dir):
    """``make_server(**settings)``: a started server of the tiny model; all are stopped after the module."""
    servers = []

    def make(**settings):
        server = start_server(served_tiny(tiny_model_dir), ServeSettings(**{"batch_wait_ms": 50.0, **settings}))
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(make_server):
    return make_server(max_new_tokens=64)


@pytest.fixture(scope="module")
def client(server):
    with client_for(server) as c:
        yield c
