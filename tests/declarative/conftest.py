"""Fixtures for the declarative tests (helpers in decl_helpers.py)."""

import pytest
from decl_helpers import make_config


@pytest.fixture
def text_config(tiny_model_dir):
    return make_config(tiny_model_dir, "text")


@pytest.fixture
def category_config(tiny_model_dir):
    return make_config(tiny_model_dir, "category")
