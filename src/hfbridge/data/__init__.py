"""Data: sources (JSONL, CSV, Parquet, datasets folders), formats, collators and the Lightning DataModule."""

from hfbridge.data.collators import PaddedCollator, StepTokenCounter
from hfbridge.data.datamodule import CausalLMDataModule, EpochShuffleSampler, load_records
from hfbridge.data.formats import (
    FORMATS,
    DataFormatError,
    TokenizedSample,
    prompt_and_reference,
    shift_for_causal_lm,
    tokenize_record,
)
from hfbridge.data.packing import PackedCollator, best_fit_decreasing, packing_is_exact
from hfbridge.data.sources import DataSourceError, read_records

__all__ = [
    "FORMATS", "CausalLMDataModule", "DataFormatError", "DataSourceError", "EpochShuffleSampler",
    "PackedCollator", "PaddedCollator", "StepTokenCounter", "best_fit_decreasing", "packing_is_exact", "TokenizedSample", "load_records", "prompt_and_reference",
    "read_records", "shift_for_causal_lm", "tokenize_record",
]
