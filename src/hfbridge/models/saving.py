"""Saving a model as a folder plain transformers (or peft) loads."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from torch import nn

from hfbridge.io import atomic_dir


def save_hf_folder(model: nn.Module, path: str | os.PathLike, preprocessor=None, merged: bool = False,
                   overwrite: bool = False) -> Path:
    """Save ``model`` (and its tokenizer or processor) to ``path``, which appears only when complete.

    A peft model saves its adapter alone (``PeftModel.from_pretrained`` loads it onto the base model), or with
    ``merged=True`` the model with the adapter merged into a copy of its weights.
    """
    from hfbridge.models.peft_adapters import is_peft_model, is_quantized

    with atomic_dir(path, overwrite=overwrite) as tmp:
        if is_peft_model(model) and merged:
            if is_quantized(model):
                raise ValueError(
                    "merging an adapter into 4/8-bit weights would lose precision; save the adapter "
                    "(merged=False) and merge it into the full-precision base model instead"
                )
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        if preprocessor is not None:
            preprocessor.save_pretrained(tmp)
    return Path(path)
