"""What ``hfbridge serve --model X`` serves: anything hfbridge loads.

* a declarative run folder, or a folder ``LLM.save`` wrote (``llm_config.yaml`` in it, its ``model/`` or its
  ``adapter/``): its model, tokenizer and generation settings, and ``/predict``;
* a ``finetune`` run folder: its ``model/`` (the adapter merged), else its ``adapter/``;
* whatever :func:`hfbridge.models.loading.load_for_inference` takes: a Hugging Face model folder, a peft adapter
  folder, a ``.gguf`` file, the embedded alias (``smollm2-135m-instruct``), a hub id in the local cache.

``--config c.yaml`` serves a declarative config's base model as it is (zero- or few-shot), with ``/predict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class ServedModel:
    model: object
    tokenizer: object
    model_id: str
    llm: object | None = None  # a declarative LLM: /predict
    sampling: dict = field(default_factory=dict)  # defaults for requests that set none: temperature, top_p


def default_model_id(name: str) -> str:
    """The name clients see: a path's last part (never the whole path), else the name as given."""
    path = Path(str(name).rstrip("/"))
    if path.exists():
        if path.name in ("model", "adapter") and path.parent.name:
            path = path.parent
        return path.stem if path.suffix.lower() == ".gguf" else path.name
    return str(name)


def _declarative_dir(path: Path) -> Path | None:
    from hfbridge.declarative.llm import CONFIG_FILE, META_FILE

    for candidate in (path, path / "model", path / "adapter"):
        if (candidate / CONFIG_FILE).exists() and (candidate / META_FILE).exists():
            return candidate
    return None


def _sampling_defaults(settings: dict) -> dict:
    """A model whose generation config samples keeps sampling when a request says nothing; others are greedy."""
    if not settings.get("do_sample"):
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": float(settings.get("temperature") or 1.0), "top_p": float(settings.get("top_p") or 1.0)}


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def open_served_model(model: str | None = None, config: str | None = None, *, device: str | None = None,
                      dtype: str = "auto", trust_remote_code: bool = False,
                      model_id: str | None = None) -> ServedModel:
    """Load what ``--model`` (or ``--config``) names, ready to serve (eval mode, on ``device``)."""
    if bool(model) == bool(config):
        raise ValueError("give exactly one of --model and --config")
    declarative = _declarative_dir(Path(model)) if model else None
    if config or declarative is not None:
        from hfbridge.declarative.run import open_llm

        llm = open_llm(str(declarative) if declarative else None, config, device,
                       trust_remote_code=trust_remote_code)
        name = model_id or (default_model_id(model) if model else llm.model_name)
        return ServedModel(llm.model, llm.tokenizer, name, llm=llm, sampling=_sampling_defaults(llm.generation))
    from hfbridge.models.loading import load_for_inference, run_folder_model

    source = run_folder_model(model) if Path(model).exists() else model
    loaded, tokenizer = load_for_inference(source, dtype, trust_remote_code)
    loaded.to(_device(device))
    generation_config = getattr(loaded, "generation_config", None)
    settings = generation_config.to_dict() if generation_config is not None else {}
    return ServedModel(loaded, tokenizer, model_id or default_model_id(model), sampling=_sampling_defaults(settings))
