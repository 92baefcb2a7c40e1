"""Tiny random vision-language models of three families, built once per session from their configs with processors
made locally (nothing touches a hub)."""

import pytest

from hfbridge.models.tiny_vlm import FAMILIES, build_tiny_vlm


@pytest.fixture(scope="session")
def vlm_dirs(tmp_path_factory):
    return {family: build_tiny_vlm(tmp_path_factory.mktemp(f"tiny-{family}"), family) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def vlm_dir(family, vlm_dirs):
    return vlm_dirs[family]
