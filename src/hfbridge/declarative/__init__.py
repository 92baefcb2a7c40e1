"""hfbridge's declarative face (seed 003): a YAML config describes an LLM task; :class:`LLM` trains, generates,
scores, saves and loads it; ``hfbridge train | predict | evaluate | serve`` run it from the shell
(``serve``: :mod:`hfbridge.serving`).

Names are imported on first use, so that the command line starts without loading the model stack.
"""

from __future__ import annotations

from hfbridge._shared import lazy_exports

_EXPORTS = {
    "LLM": "hfbridge.declarative.llm",
    "load_llm": "hfbridge.declarative.llm",
    "realign_target_and_prediction_tensors": "hfbridge.declarative.llm",
    "ConfigError": "hfbridge.declarative.schema",
    "LLMConfig": "hfbridge.declarative.schema",
    "load_config": "hfbridge.declarative.schema",
    "parse_config": "hfbridge.declarative.schema",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
