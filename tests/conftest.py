"""Fixtures shared by every test directory (helpers to import live in their own modules)."""

from __future__ import annotations

import signal

import pytest

from embedding_setup import make_embedding_setup


@pytest.fixture
def emb_setup():
    return make_embedding_setup()


@pytest.fixture(autouse=True, scope="session")
def _sigint_as_interactive():
    """SIGINT raises KeyboardInterrupt here and in the subprocesses tests start, as in a terminal.

    A shell that starts a job in the background (``cmd &``) makes it ignore
    SIGINT, and Python then keeps ignoring it, as do its children; the tests of
    Ctrl-C handling need the usual behaviour. (A caught signal is reset to the
    default on exec, so the children's Python installs its own handler.)
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
