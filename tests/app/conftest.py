"""Fixtures of the app tests: the reasoning model (see reasoning.py)."""
from __future__ import annotations

import pytest

from app.engine import Engine, LoadOptions
from models.registry import ModelEntry

from .reasoning import build_r1_gguf


@pytest.fixture(scope="session")
def r1_gguf(bundled_path, tmp_path_factory):
    return build_r1_gguf(bundled_path, tmp_path_factory.mktemp("r1") / "smollm2-r1.gguf")


@pytest.fixture(scope="session")
def r1_engine(r1_gguf):
    eng = Engine.load(ModelEntry("smollm2-r1", str(r1_gguf), "gguf"), LoadOptions(n_ctx=1024, seed=1))
    yield eng
    eng.close()
