"""Fixtures shared by every test directory (helpers to import live in their own modules)."""

from __future__ import annotations

import pytest

from embedding_setup import make_embedding_setup


@pytest.fixture
def emb_setup():
    return make_embedding_setup()
