"""Tiny random vision-language models of three families, built once per session from their configs with processors
made locally (nothing touches a hub)."""

import pytest

from hfbridge.models.tiny_image_text import FAMILIES, build_tiny_image_text


@pytest.fixture(scope="session")
def image_text_dirs(tmp_path_factory):
    return {family: build_tiny_image_text(tmp_path_factory.mktemp(f"tiny-{family}"), family) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def image_text_dir(family, image_text_dirs):
    return image_text_dirs[family]
