"""Exporting a model to other runtimes' formats: GGUF for llama.cpp and Ollama (``hfbridge export``)."""

from hfbridge.export.gguf import (
    QUANTS,
    SUPPORTED_MODEL_TYPES,
    TOLERANCES,
    CheckResult,
    ExportResult,
    export_gguf,
    is_hfbridge_gguf,
)

__all__ = ["QUANTS", "SUPPORTED_MODEL_TYPES", "TOLERANCES", "CheckResult", "ExportResult", "export_gguf",
           "is_hfbridge_gguf"]
