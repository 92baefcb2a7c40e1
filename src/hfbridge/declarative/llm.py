"""The declarative ``LLM`` (seed 003): one object that trains, generates, scores, saves and loads a causal LM
described by an :class:`~hfbridge.declarative.schema.LLMConfig`.

It is a face on the core, not a second stack: models load through :mod:`hfbridge.models.loading` (dtype policy,
4/8-bit), adapters come from :mod:`hfbridge.models.peft_adapters`, records are tokenized by :mod:`hfbridge.data.formats`, training
runs :class:`hfbridge.HFAutoModelForCausalLM` with a :class:`hfbridge.CausalLMDataModule` under Lightning (so the loss
is normalised per label token of the optimizer step), generation is the core's batched, left-padded
:func:`hfbridge.generation.generate_ids`, and saving uses the core's atomic folders.

Tensor-level API (the seed's): ``inputs`` map the first input feature's name to left-padded prompt ids
(:meth:`LLM.encode_inputs` builds them from records; the prompt template has already combined every input column),
``targets`` map the output feature's name to left-padded target ids (:meth:`LLM.encode_targets`). Outputs are flat
dicts keyed ``"{feature}::{tensor}"``; :meth:`LLM.outputs_to_predictions` groups them per feature.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hfbridge.declarative.devices import (
    check_quantization,
    dispatch_over_gpus,
    gpu_free_memory,
    plan_max_memory,
    resolve_device,
)
from hfbridge.declarative.encoding import SampleEncoder
from hfbridge.declarative.features import OutputFeature, build_output_feature
from hfbridge.declarative.prompt import PromptRenderer
from hfbridge.declarative.regularization import regularization_loss, regularizes
from hfbridge.declarative.retrieval import nearest, same_record_mask
from hfbridge.declarative.schema import FeatureConfig, LLMConfig, dump_config, load_config, parse_config
from hfbridge.generation import cache_argument, generate_ids, left_pad, returned_cache
from hfbridge.io import atomic_dir
from hfbridge.losses import IGNORE_INDEX
from hfbridge.models import loading
from hfbridge.models.peft_adapters import is_peft_model, is_quantized

log = logging.getLogger(__name__)

WEIGHTS_DIR = "model_weights"
CONFIG_FILE = "llm_config.yaml"
META_FILE = "llm_meta.json"
DEFAULT_CONTEXT = 2048  # the seed's fallback when the model's config does not say


# ------------------------------------------------------------------------------------------------ realignment
def realign_target_and_prediction_tensors(
    targets: dict[str, torch.Tensor],
    predictions: dict[str, dict[str, torch.Tensor]],
    of_name: str,
    tokenizer,
    pad_direction: str = "right",
    pad_value: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Pad the shorter of ``targets[of_name]`` (``[batch, T]``) and ``predictions[of_name]["predictions"]``
    (``[batch, P]``, with ``probabilities``/``logits`` ``[batch, P, ...]`` padded alike) to the other's length,
    on the ``pad_direction`` side, and cast them to float32 for metric computation.

    ``pad_value`` defaults to the tokenizer's pad id (its EOS id when it has none); an explicit 0 is honoured
    (the seed's ``if not pad_value`` replaced it). New dicts are returned; the inputs are not changed.
    """
    if pad_direction not in ("left", "right"):
        raise ValueError(f"pad_direction must be 'left' or 'right', got {pad_direction!r}")
    if pad_value is None:
        pad_value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    targets = dict(targets)
    predictions = {**predictions, of_name: dict(predictions[of_name])}
    target = targets[of_name]
    preds = predictions[of_name]
    t_len, p_len = target.shape[1], preds["predictions"].shape[1]

    def pad(tensor: torch.Tensor, n: int) -> torch.Tensor:
        widths = [0, 0] * (tensor.dim() - 2) + ([0, n] if pad_direction == "right" else [n, 0])
        return F.pad(tensor, widths, value=pad_value)

    if t_len > p_len:
        for key in ("predictions", "probabilities", "logits"):
            if key in preds:
                preds[key] = pad(preds[key], t_len - p_len)
    elif p_len > t_len:
        targets[of_name] = pad(target, p_len - t_len)
    for key in ("predictions", "probabilities", "logits"):
        if key in preds:
            preds[key] = preds[key].to(torch.float32)
    targets[of_name] = targets[of_name].to(torch.float32)
    return targets, predictions


def _as_long(value) -> torch.Tensor:
    return value.long() if isinstance(value, torch.Tensor) else torch.as_tensor(value).long()


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _progress(parts: Iterator[Sequence], total: int, batch_size: int, show: bool, desc: str) -> Iterator[Sequence]:
    """``parts``, with a progress bar (in batches) when ``show``."""
    if not show:
        yield from parts
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="record") as bar:
        for part in parts:
            yield part
            bar.update(len(part))


@dataclass
class EvalResult:
    metrics: dict
    predictions: list[dict]


# ------------------------------------------------------------------------------------------------ the model
class LLM:
    """A causal LM described by a config: text or category output, optional adapter and quantization.

    Args (the seed's):
        config_obj: an :class:`LLMConfig`, a mapping, or a YAML path.
        random_seed: seeds torch (adapter initialisation, training order).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; ``None`` picks the GPU when there is one. ``cuda`` with several
            GPUs spreads the model over them by their free memory (:meth:`to_device`).
        weights_path (keyword): a folder written by :meth:`save`; the weights are loaded from it instead of
            the base model's (:func:`load_llm` passes it).
        load_model (keyword): ``False`` builds everything but the model (tokenizer, prompts, metrics); the model is
            set later (``llm.model = ...``). ``hfbridge train`` on a device mesh uses it: the core's module loads
            and shards the weights, each rank only its own.

    Differences from the seed, on purpose: the model loads in ``model_parameters.dtype`` (``auto``: float32 on
    CPU, bfloat16 on GPUs) rather than float32 everywhere; generation is batched; category outputs are scored by
    label log-likelihood and can be fine-tuned.
    """

    def __init__(self, config_obj: LLMConfig | dict | str | Path, random_seed: int = 42,
                 device: str | torch.device | None = None, **kwargs):
        weights_path = kwargs.pop("weights_path", None)
        load_model = kwargs.pop("load_model", True)
        if kwargs:
            log.debug("LLM ignores %s", sorted(kwargs))
        if isinstance(config_obj, (str, Path)):
            config_obj = load_config(config_obj)
        self.config_obj: LLMConfig = parse_config(config_obj)
        self._random_seed = random_seed
        self.model_name = self.config_obj.base_model
        torch.manual_seed(random_seed)
        self.target_device = resolve_device(device)
        if self.config_obj.quantization is not None:
            check_quantization(self.config_obj.quantization.bits, self.target_device)
        self.curr_device = torch.device("cpu")
        params = self.config_obj.model_parameters
        self._base_path = loading.resolve_model_path(self.model_name, params.trust_remote_code)
        model_config = loading.load_config(self._base_path, params.trust_remote_code)
        self.context_len = loading.context_length(model_config) or DEFAULT_CONTEXT
        loading.check_max_length(self.config_obj.preprocessing.max_sequence_length, model_config,
                                 "preprocessing.max_sequence_length")
        self.max_new_tokens = self.config_obj.max_new_tokens
        self.max_input_length = self.context_len - self.max_new_tokens - 8
        if self.max_input_length < 1:
            raise ValueError(f"generation.max_new_tokens={self.max_new_tokens} leaves no room for a prompt in the "
                             f"model's context of {self.context_len} tokens")
        self.generation = {k: v for k, v in self.config_obj.generation.items() if k != "max_new_tokens"}
        self._vocab = int(model_config.vocab_size)
        self.trained = False
        self.model = None
        self.tokenizer = None
        self._weights_dir: Path | None = None  # where the weights under an adapter come from, when not the base's
        if weights_path is not None:
            self.load(weights_path)
        else:
            self.tokenizer = loading.load_tokenizer(self._base_path, params.trust_remote_code)
            if load_model:
                self.model = self._load_pretrained(self._base_path)
                self.initialize_adapter()
        self.input_features = {f.name: f for f in self.config_obj.input_features}
        self._build_text_parts()
        self.to_device(self.target_device)

    @staticmethod
    def type() -> str:
        return "llm"

    @property
    def model(self):
        """The Hugging Face (or peft) model. Setting it forgets what was derived from the old one (the forward's
        arguments, the few-shot pool's embeddings)."""
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model = value
        self._forward_keys: set[str] | None = None
        self._pool_vectors: torch.Tensor | None = None

    def _build_text_parts(self) -> None:
        """Output features, prompt renderer and encoder: everything that depends on the tokenizer."""
        self.output_features = self.build_outputs(self.config_obj.output_features, self._vocab_size(),
                                                  tokenizer=self.tokenizer)
        self._output_feature_decoder = next(iter(self.output_features.values()))
        self.renderer = PromptRenderer.for_tokenizer(self.config_obj, self.tokenizer)
        self.encoder = SampleEncoder(self.tokenizer, self.renderer)
        self._label_tails: list[list[int]] | None = None

    # -------------------------------------------------------------------------------------------- building
    def _load_pretrained(self, path):
        params, quant = self.config_obj.model_parameters, self.config_obj.quantization
        device_map = None
        if quant is not None:  # bitsandbytes places quantized weights at load time
            device_map = self._quantized_device_map()
        model = loading.load_pretrained_model(
            path, dtype=loading.resolve_dtype(params.dtype, self.target_device),
            attn_implementation=params.attn_implementation,
            load_in_4bit=quant is not None and quant.bits == 4, load_in_8bit=quant is not None and quant.bits == 8,
            trust_remote_code=params.trust_remote_code, device_map=device_map,
        )
        model.eval()
        if quant is not None:
            self.curr_device = self.target_device
        return model

    def _quantized_device_map(self):
        dev = self.target_device
        if dev.type == "cpu":
            return {"": "cpu"}
        if dev.index is None and torch.cuda.device_count() > 1:
            return "auto"
        return {"": dev.index or 0}

    def _vocab_size(self) -> int:
        if self.model is None:
            return self._vocab
        return int(self.model.get_input_embeddings().weight.shape[0])

    @classmethod
    def build_outputs(cls, output_feature_configs: Sequence[FeatureConfig], input_size: int | None = None,
                      tokenizer=None) -> dict[str, OutputFeature]:
        """The output feature (one: the seed supports a single task), keyed by name."""
        if len(output_feature_configs) > 1:
            raise ValueError("Only single task currently supported")
        config = output_feature_configs[0]
        return {config.name: build_output_feature(config, tokenizer)}

    @property
    def output_feature_decoder(self) -> OutputFeature:
        """The output feature that turns model outputs into predictions."""
        return self._output_feature_decoder

    @property
    def _of_name(self) -> str:
        return self.config_obj.output_feature.name

    @property
    def _in_name(self) -> str:
        return self.config_obj.input_features[0].name

    def initialize_adapter(self) -> None:
        """Wrap the model with the configured peft adapter (through :class:`hfbridge.LoRA`), if any."""
        adapter = self.config_obj.adapter
        if adapter is None:
            return
        from hfbridge.models.peft_adapters import LoRA, trainable_parameters

        transform = LoRA(r=adapter.r, alpha=adapter.alpha, dropout=adapter.dropout,
                         target_modules=adapter.target_modules, adapter_type=adapter.type,
                         extra=dict(adapter.options))
        self.model = transform(self.model)
        trainable, total = trainable_parameters(self.model)
        log.info("adapter %s: %.2fM of %.1fM parameters trainable", adapter.type, trainable / 1e6, total / 1e6)

    def get_args(self) -> tuple[list[dict], list[dict], int]:
        """``(input features, output features, random seed)``: what it takes to build the model again."""
        return ([asdict(f) for f in self.config_obj.input_features],
                [asdict(f) for f in self.config_obj.output_features], self._random_seed)

    # -------------------------------------------------------------------------------------------- devices
    def to_device(self, device: str | torch.device | None) -> LLM:
        """Move the model to ``device``. ``cuda`` (no index) with several GPUs spreads the layers over them, each
        GPU's budget being its free memory less a margin (:func:`~hfbridge.declarative.devices.plan_max_memory`).
        On the CPU, for a model already there, this is a no-op (logged). Quantized weights stay where they were
        loaded."""
        device = resolve_device(device)
        if self.model is None:
            self.target_device = device
            return self
        if device == self.curr_device or (device.type == "cpu" and self.curr_device.type == "cpu"):
            log.info("to_device(%s): the model is already there; nothing to do", device)
            return self
        if is_quantized(self.model):
            log.info("to_device(%s): quantized weights stay on %s, where they were loaded", device, self.curr_device)
            return self
        log.info("moving the model from %s to %s", self.curr_device, device)
        if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
            self.model = dispatch_over_gpus(self.model, plan_max_memory(gpu_free_memory()))
        else:
            self.model.to(device)
        self.curr_device = device
        return self

    def _input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @contextlib.contextmanager
    def _inference(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    # -------------------------------------------------------------------------------------------- encoding
    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @property
    def max_sequence_length(self) -> int:
        return self.config_obj.preprocessing.max_sequence_length or self.context_len

    def encode_inputs(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        """``{first input feature: left-padded prompt ids}`` of records (rendered by the prompt template, with
        their few-shot examples)."""
        examples = self.few_shot_examples(records)
        ids, _ = left_pad([self.encoder.prompt_ids(r, e) for r, e in zip(records, examples)], self.pad_id)
        return {self._in_name: ids}

    def training_samples(self, records: Sequence[dict]) -> list[dict]:
        """Records as training samples of the core format (prompt and target as the model sees them); with
        similarity retrieval a record is never shown itself (its own answer) as an example."""
        examples = self.few_shot_examples(records, exclude_self=True)
        return [self.renderer.sample(r, examples=e) for r, e in zip(records, examples)]

    # -------------------------------------------------------------------------------------------- few-shot
    def embed(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """``[len(texts), hidden]``: each text's last hidden state averaged over its tokens, scaled to unit length
        (right-padded batches, so padding changes no token's state). Used to retrieve similar examples."""
        batch_size = batch_size or self.config_obj.trainer.eval_batch_size
        device, rows = self._input_device(), []
        keep = {"logits_to_keep": 1} if self._accepts("logits_to_keep") else {}
        with self._inference():
            for part in _chunks(list(texts), batch_size):
                encoded = [self.tokenizer(t, add_special_tokens=True)["input_ids"][: self.max_input_length]
                           or [self.pad_id] for t in part]
                width = max(map(len, encoded))
                ids = torch.tensor([e + [self.pad_id] * (width - len(e)) for e in encoded])
                mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
                out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                                 output_hidden_states=True, **keep)
                hidden, weights = out.hidden_states[-1].float().cpu(), mask[..., None].float()
                rows.append((hidden * weights).sum(1) / weights.sum(1))
        return F.normalize(torch.cat(rows), dim=-1) if rows else torch.zeros(0, 0)

    def few_shot_examples(self, records: Sequence[dict], exclude_self: bool = False) -> list[list[dict] | None]:
        """Each record's few-shot examples: with ``prompt.few_shot_retrieval: similarity`` the ``prompt.few_shot``
        pool records (``prompt.examples``) most similar to it (:mod:`hfbridge.declarative.retrieval`); else
        ``None`` (the prompt shows the config's examples). ``exclude_self`` leaves out pool records equal to the
        record (for training samples)."""
        prompt = self.config_obj.prompt
        if prompt.few_shot_retrieval != "similarity" or not prompt.examples or not records:
            return [None] * len(records)
        if self._pool_vectors is None:  # embedded once per model (setting llm.model forgets them)
            self._pool_vectors = self.embed([self.renderer.render(e) for e in prompt.examples])
        queries = self.embed([self.renderer.render(r) for r in records])
        exclude = same_record_mask(self.config_obj, records, prompt.examples) if exclude_self else None
        picked = nearest(queries, self._pool_vectors, prompt.few_shot, exclude)
        return [[prompt.examples[j] for j in row] for row in picked]

    def encode_targets(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        """``{output feature: left-padded target ids}`` (the target's own tokens, without the stop tokens)."""
        ids, _ = left_pad([self.encoder.target_ids(r) for r in records], self.pad_id)
        return {self._of_name: ids}

    def _unpack_inputs(self, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        targets = None
        if isinstance(inputs, tuple):
            inputs, targets = inputs
        if self._in_name not in inputs:
            raise KeyError(f"inputs need the first input feature {self._in_name!r}; got {sorted(inputs)}")
        input_ids = _as_long(inputs[self._in_name])
        target_ids = None
        if targets is not None:
            if self._of_name not in targets:
                raise KeyError(f"targets need the output feature {self._of_name!r}; got {sorted(targets)}")
            target_ids = _as_long(targets[self._of_name])
        return input_ids, target_ids

    def _remove_left_padding(self, row: torch.Tensor) -> list[int]:
        ids = row.tolist()
        start = 0
        while start < len(ids) and ids[start] == self.pad_id:
            start += 1
        return ids[start:]

    def _add_left_padding(self, input_ids: torch.Tensor, max_length: int, pad_value: int = 0) -> torch.Tensor:
        """``input_ids`` (1-D) with ``pad_value`` prepended up to ``max_length``."""
        padding = torch.full((max_length - input_ids.shape[0],), pad_value, dtype=input_ids.dtype,
                             device=input_ids.device)
        return torch.cat((padding, input_ids), dim=-1)

    def _create_attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 from each row's first non-pad token on. The seed's ``input_ids != pad`` also masked pad ids inside
        a sequence, and many chat models pad with their end-of-turn token, which every chat prompt contains."""
        return ((input_ids != self.pad_id).long().cumsum(-1) > 0).long()

    def _tail(self, target: list[int]) -> list[int]:
        """What is trained after the prompt: the target and the stop tokens, at most ``max_sequence_length - 1``."""
        return [*target, *self.encoder.stop_ids][: self.max_sequence_length - 1]

    def _fit(self, prompt: list[int], tail: list[int]) -> list[int]:
        room = self.max_sequence_length - len(tail)
        if len(prompt) > room:
            log.warning("a sample of %d tokens is longer than max_sequence_length=%d: its prompt keeps its last %d "
                        "tokens", len(prompt) + len(tail), self.max_sequence_length, room)
            prompt = prompt[len(prompt) - room :]
        return prompt + tail

    def _generate_merged_ids(self, input_ids: torch.Tensor, target_ids: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge each sample's prompt and target (left padding removed) with the stop tokens appended (EOS, or
        the chat end-of-turn), left-pad to the longest, and build attention masks from the lengths."""
        if target_ids is None:
            return input_ids, self._create_attention_mask(input_ids)
        merged = []
        for input_row, target_row in zip(input_ids, target_ids):
            tail = self._tail(self._remove_left_padding(target_row))
            merged.append(torch.tensor(self._fit(self._remove_left_padding(input_row), tail), dtype=torch.long))
        max_length = max(m.shape[0] for m in merged)
        ids = torch.stack([self._add_left_padding(m, max_length, self.pad_id) for m in merged])
        masks = torch.stack([self._add_left_padding(torch.ones_like(m), max_length, 0) for m in merged])
        return ids, masks

    def _target_labels(self, target_ids: torch.Tensor, length: int) -> torch.Tensor:
        """Next-token labels ``[batch, length]`` aligned with the right end of merged sequences: the target and
        stop tokens are predicted from the position before each, the last position predicts nothing."""
        rows = []
        for target_row in target_ids:
            labels = torch.tensor([*self._tail(self._remove_left_padding(target_row)), IGNORE_INDEX])[-length:]
            rows.append(self._add_left_padding(labels, length, IGNORE_INDEX))
        return torch.stack(rows)

    # -------------------------------------------------------------------------------------------- forward
    def _accepts(self, key: str) -> bool:
        if self._forward_keys is None:
            base = self.model.get_base_model() if is_peft_model(self.model) else self.model
            self._forward_keys = set(inspect.signature(base.forward).parameters)
        return key in self._forward_keys

    def _cache_argument(self) -> str | None:
        self._accepts("input_ids")  # reads the forward's parameters once
        return cache_argument(self._forward_keys)

    def _logits(self, ids: torch.Tensor, attention: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """The model's logits for left-padded ``ids`` (position ids from the mask), the last ``keep`` only."""
        device = self._input_device()
        kwargs = {"input_ids": ids.to(device), "attention_mask": attention.to(device)}
        if self._accepts("position_ids"):
            kwargs["position_ids"] = (attention.long().cumsum(-1) - 1).clamp(min=0).to(device)
        if self._accepts("use_cache"):
            kwargs["use_cache"] = False
        if keep is not None and self._accepts("logits_to_keep"):
            kwargs["logits_to_keep"] = keep
        logits = self.model(**kwargs).logits
        return logits[:, -keep:] if keep is not None else logits

    def forward(self, inputs, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits for fine-tuning: ``inputs`` is ``{input: ids}`` or ``({input: ids}, {output: target ids})``;
        with targets, prompt and target are merged (:meth:`_generate_merged_ids`). Returns
        ``{"{output}::logits": [batch, length, vocab]}`` in float32."""
        input_ids, target_ids = self._unpack_inputs(inputs)
        if target_ids is None:
            ids, attention = input_ids, mask if mask is not None else self._create_attention_mask(input_ids)
        else:
            ids, attention = self._generate_merged_ids(input_ids, target_ids)
        return {f"{self._of_name}::logits": self._logits(ids, attention).float()}

    __call__ = forward

    # -------------------------------------------------------------------------------------------- losses
    def _feature_output(self, predictions: dict, of_name: str, key: str):
        if of_name in predictions and isinstance(predictions[of_name], dict):
            return predictions[of_name].get(key)
        return predictions.get(f"{of_name}::{key}")

    def _token_loss(self, targets: dict, predictions: dict, of_name: str) -> torch.Tensor:
        logits = self._feature_output(predictions, of_name, "logits")
        if logits is None:
            raise KeyError(f"predictions have no logits for {of_name!r}; pass the output of forward()")
        labels = self._target_labels(_as_long(targets[of_name]), logits.shape[1]).to(logits.device)
        valid = labels != IGNORE_INDEX
        if not bool(valid.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits[valid].float(), labels[valid])

    def train_loss(self, targets: dict, predictions: dict, regularization_type: str | None = None,
                   regularization_lambda: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross-entropy per target token (the target and its stop tokens; prompts and padding are never
        trained), plus an optional l1/l2 penalty on the trainable weights. Returns ``(loss, {output: loss})``."""
        per_feature = {name: self._token_loss(targets, predictions, name) for name in self.output_features}
        loss = sum(per_feature.values())
        if regularizes(regularization_type, regularization_lambda):
            loss = loss + regularization_loss(self.model, regularization_type, regularization_lambda)
        return loss, per_feature

    def eval_loss(self, targets: dict, predictions: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(evaluation loss, additional losses)``: the same per-token loss; there are no additional losses."""
        loss = sum(self._token_loss(targets, predictions, n) for n in self.output_features)
        return loss, torch.zeros((), device=loss.device)

    # -------------------------------------------------------------------------------------------- generation
    def _label_tail_ids(self) -> list[list[int]]:
        if self._label_tails is None:
            labels = self.output_feature_decoder.labels
            self._label_tails = [self._tail(self.encoder.target_ids({}, label)) for label in labels]
        return self._label_tails

    def score_labels(self, prompts: Sequence[Sequence[int]], batch_size: int | None = None) -> torch.Tensor:
        """Log-likelihood ``[batch, labels]`` of each label's tokens (and stop tokens) after each prompt.

        Each prompt is run once; its KV cache is then repeated for the labels, which are scored together as short
        continuations (a model without ``position_ids`` or a cache scores every prompt + label in full).
        """
        tails = self._label_tail_ids()
        batch_size = batch_size or self.config_obj.trainer.eval_batch_size
        cached = self._accepts("position_ids") and self._cache_argument() is not None
        score = self._score_part_cached if cached else self._score_part_full
        rows: list[torch.Tensor] = []
        with self._inference():
            for part in _chunks([list(p)[-self.max_input_length :] for p in prompts], batch_size):
                rows.append(score(part, tails))
        return torch.cat(rows)

    def _score_part_full(self, part: list[list[int]], tails: list[list[int]]) -> torch.Tensor:
        seqs = [p + tail for p in part for tail in tails]
        ids, attention = left_pad(seqs, self.pad_id)
        keep = max(len(t) for t in tails) + 1
        logp = torch.log_softmax(self._logits(ids, attention, keep).float(), dim=-1).cpu()
        scores = []
        for row in range(len(seqs)):
            tail = tails[row % len(tails)]
            picked = logp[row, keep - len(tail) - 1 : keep - 1].gather(-1, torch.tensor(tail)[:, None])
            scores.append(picked.sum())
        return torch.stack(scores).view(len(part), len(tails))

    def _score_part_cached(self, part: list[list[int]], tails: list[list[int]]) -> torch.Tensor:
        device, k = self._input_device(), len(tails)
        ids, attention = left_pad(part, self.pad_id)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        kwargs = {"logits_to_keep": 1} if self._accepts("logits_to_keep") else {}
        out = self.model(input_ids=ids.to(device), attention_mask=attention.to(device),
                         position_ids=positions.to(device), use_cache=True, **kwargs)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()  # predicts each tail's first token
        scores = first[:, [t[0] for t in tails]].clone()
        longest = max(len(t) for t in tails)
        if longest == 1:
            return scores
        cache = returned_cache(out)
        cache.batch_repeat_interleave(k)
        width = longest - 1  # the tails but their last token, right-padded: they predict tokens 1..len-1
        cont = torch.full((len(part) * k, width), self.pad_id, dtype=torch.long)
        cont_mask = torch.zeros_like(cont)
        for row in range(len(part) * k):
            tail = tails[row % k][:-1]
            cont[row, : len(tail)] = torch.tensor(tail, dtype=torch.long)
            cont_mask[row, : len(tail)] = 1
        mask = torch.cat([attention.repeat_interleave(k, 0), cont_mask], dim=-1)
        start = attention.sum(-1).repeat_interleave(k, 0)[:, None]
        out = self.model(input_ids=cont.to(device), attention_mask=mask.to(device),
                         position_ids=(start + torch.arange(width)).to(device), use_cache=True,
                         **{self._cache_argument(): cache})
        logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()
        for row in range(len(part) * k):
            tail = tails[row % k]
            if len(tail) > 1:
                picked = logp[row, : len(tail) - 1].gather(-1, torch.tensor(tail[1:])[:, None])
                scores[row // k, row % k] += picked.sum()
        return scores

    def _generate_from_ids(self, prompts: list[list[int]], batch_size: int | None = None) -> dict:
        name, feature = self._of_name, self.output_feature_decoder
        batch_size = batch_size or self.config_obj.trainer.eval_batch_size
        if feature.type == "category":
            log_likelihoods = self.score_labels(prompts, batch_size)
            labels, probabilities = feature.decode(log_likelihoods)
            return {f"{name}::predictions": labels, f"{name}::probabilities": probabilities,
                    f"{name}::logits": log_likelihoods}
        ids = generate_ids(self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                           batch_size=batch_size, max_input_length=self.max_input_length, **self.generation)
        return {f"{name}::predictions": feature.decode(ids), f"{name}::generated_ids": ids}

    def generate(self, inputs, mask: torch.Tensor | None = None, batch_size: int | None = None) -> dict:
        """Predictions for ``{input: left-padded prompt ids}``, batched.

        Text: generated with the config's generation settings (greedy unless it says otherwise), left-padded
        batches sorted by length; prompts longer than ``max_input_length = context - max_new_tokens - 8`` keep
        their last tokens, with a warning. Returns ``{"{output}::predictions": texts, "::generated_ids": ids}``.
        Category: every label is scored by its log-likelihood after the prompt; returns predictions (labels),
        probabilities ``[batch, labels]`` and logits (the log-likelihoods).
        """
        input_ids, _ = self._unpack_inputs(inputs)
        prompts = [self._remove_left_padding(row) for row in input_ids]
        cut = sum(len(p) > self.max_input_length for p in prompts)
        if cut:
            log.warning("%d of %d inputs are longer than max_input_length=%d (context %d - max_new_tokens %d - 8) "
                        "and keep only their last tokens", cut, len(prompts), self.max_input_length,
                        self.context_len, self.max_new_tokens)
        return self._generate_from_ids(prompts, batch_size)

    def outputs_to_predictions(self, outputs: dict) -> dict[str, dict]:
        """``{"{feature}::{tensor}": value}`` grouped as ``{feature: {tensor: value}}``."""
        predictions: dict[str, dict] = {name: {} for name in self.output_features}
        for key, value in outputs.items():
            name, _, tensor = key.partition("::")
            if name in predictions and tensor:
                predictions[name][tensor] = value
        return predictions

    # -------------------------------------------------------------------------------------------- metrics
    def update_metrics(self, targets: dict, predictions: dict) -> None:
        """Add a batch to each output feature's metrics. ``targets``: ``{output: left-padded target ids}``.
        ``predictions`` (grouped or flat) may hold ``logits`` of the merged sequences (teacher-forced: loss,
        perplexity, token accuracy) and ``predictions`` (generated texts or labels, compared with the decoded
        targets) with ``probabilities`` for a category."""
        for name, feature in self.output_features.items():
            target_ids = _as_long(targets[name])
            logits = self._feature_output(predictions, name, "logits")
            if logits is not None and logits.dim() == 3:
                labels = self._target_labels(target_ids, logits.shape[1]).to(logits.device)
                feature.metrics.tokens.update(logits, labels)
            predicted = self._feature_output(predictions, name, "predictions")
            if predicted is None:
                continue
            references = [self.tokenizer.decode(self._remove_left_padding(row), skip_special_tokens=True).strip()
                          for row in target_ids]
            if feature.type == "text":
                feature.metrics.update_text(list(predicted), references)
            else:
                probabilities = self._feature_output(predictions, name, "probabilities")
                truth = [feature.label_index(r) for r in references]
                if min(truth) < 0:
                    raise ValueError(f"a target is not one of the labels {feature.labels}: {references}")
                feature.metrics.update(truth, probabilities.cpu())

    def reset_metrics(self) -> None:
        for feature in self.output_features.values():
            feature.reset_metrics()

    def get_metrics(self) -> dict[str, dict]:
        return {name: feature.metrics.compute() for name, feature in self.output_features.items()}

    # -------------------------------------------------------------------------------------------- records
    def evaluate(self, records: Sequence[dict], batch_size: int | None = None, progress: bool = False) -> EvalResult:
        """Metrics of the output feature over ``records`` (teacher-forced loss, then generated or scored
        predictions), and the prediction rows."""
        batch_size = batch_size or self.config_obj.trainer.eval_batch_size
        self.reset_metrics()
        rows: list[dict] = []
        for part in _progress(_chunks(list(records), batch_size), len(records), batch_size, progress, "evaluating"):
            inputs, targets = self.encode_inputs(part), self.encode_targets(part)
            with self._inference():
                ids, attention = self._generate_merged_ids(inputs[self._in_name], targets[self._of_name])
                keep = max(len(self._tail(self._remove_left_padding(t))) for t in targets[self._of_name]) + 1
                teacher_forced = {f"{self._of_name}::logits": self._logits(ids, attention, keep).float().cpu()}
            self.update_metrics(targets, teacher_forced)
            predictions = self.outputs_to_predictions(self.generate(inputs, batch_size=batch_size))
            self.update_metrics(targets, predictions)
            rows.extend(self._prediction_rows(predictions))
        return EvalResult(self.get_metrics(), rows)

    def predict(self, records: Sequence[dict], batch_size: int | None = None, progress: bool = False) -> list[dict]:
        """One row per record: ``{output}_predictions`` (and, for a category, the probability of each label)."""
        batch_size = batch_size or self.config_obj.trainer.eval_batch_size
        rows: list[dict] = []
        for part in _progress(_chunks(list(records), batch_size), len(records), batch_size, progress, "predicting"):
            rows.extend(self._prediction_rows(self.outputs_to_predictions(
                self.generate(self.encode_inputs(part), batch_size=batch_size))))
        return rows

    def _prediction_rows(self, predictions: dict) -> list[dict]:
        name, feature = self._of_name, self.output_feature_decoder
        out = predictions[name]
        rows = []
        for i, predicted in enumerate(out["predictions"]):
            row = {f"{name}_predictions": predicted}
            if feature.type == "category":
                probabilities = out["probabilities"][i].tolist()
                row[f"{name}_probability"] = max(probabilities)
                for label, p in zip(feature.labels, probabilities):
                    row[f"{name}_probabilities_{label}"] = p
            rows.append(row)
        return rows

    def train(self, train_records: Sequence[dict], validation_records: Sequence[dict] | None = None,
              output_dir: str | Path | None = None, progress_bar: bool = True):
        """Fine-tune with the core: records rendered into samples, :class:`hfbridge.CausalLMDataModule`,
        :class:`hfbridge.HFAutoModelForCausalLM` (plus the trainer's regularization) and Lightning's ``Trainer``.
        After :meth:`load` it continues from the loaded weights (see there). Returns the trainer."""
        from hfbridge.declarative.training import fit

        trainer = fit(self, train_records, validation_records, output_dir, progress_bar)
        self.trained = True
        return trainer

    # -------------------------------------------------------------------------------------------- saving
    def _weights_kind(self, merged: bool) -> str:
        if self.config_obj.trainer.type == "none" and not self.trained:
            return "none"
        if is_peft_model(self.model):
            return "merged" if merged else "adapter"
        return "full"

    def save(self, save_path: str | Path, merged: bool = False, overwrite: bool = False) -> Path:
        """Write ``save_path/`` (complete or absent): ``llm_config.yaml``, ``llm_meta.json`` and, when weights
        changed, ``model_weights/`` (the adapter alone, or with ``merged=True`` the model with the adapter merged,
        loadable by plain transformers). With ``trainer.type: none`` only the config is written, as in the seed:
        loading then uses the base model.

        An adapter trained on weights loaded from a merged or full save (:meth:`load`, then :meth:`train`) belongs
        to those weights, not to the base model: ``llm_meta.json`` names their folder (``adapter_base``), and
        :meth:`load` puts the adapter back on them (save with ``merged=True`` for a folder that stands alone)."""
        from hfbridge.models.causal_lm import HFAutoModelForCausalLM

        kind = self._weights_kind(merged)
        save_path = Path(save_path)
        with atomic_dir(save_path, overwrite=overwrite) as tmp:
            dump_config(self.config_obj, tmp / CONFIG_FILE)
            if kind == "none":
                log.info("trainer.type is none: no weights changed, so only the config is saved")
            else:
                module = HFAutoModelForCausalLM(model_name=self.model, tokenizer=self.tokenizer)
                module.model = self.model
                module.save_pretrained(tmp / WEIGHTS_DIR, merged=merged)
            meta = {"weights": kind, "random_seed": self._random_seed, "chat": self.renderer.chat,
                    "base_model": self.model_name}
            if kind == "adapter" and self._weights_dir is not None:
                meta["adapter_base"] = str(self._weights_dir.resolve())
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        return save_path

    def load(self, save_path: str | Path) -> None:
        """Load the weights :meth:`save` wrote, ready to predict or to train further: an adapter onto a freshly
        loaded base model (peft's ``PeftConfig`` + ``PeftModel``, trainable, as the seed's ``inference_mode=False``
        asks), or the full/merged weights, or (config only) the base model.

        :meth:`train` then continues from them: the loaded adapter trains on; merged weights get a fresh adapter
        of the config's ``adapter`` section on top (its update starts at zero, so training starts from exactly the
        saved model), or train in full when the config has no adapter."""
        save_path = Path(save_path)
        meta = json.loads((save_path / META_FILE).read_text())
        weights = save_path / WEIGHTS_DIR
        params = self.config_obj.model_parameters
        kind = meta.get("weights", "none")
        self._weights_dir = None
        if kind == "adapter":
            from peft import PeftConfig, PeftModel

            peft_config = PeftConfig.from_pretrained(str(weights))
            base_path = self._base_path
            if meta.get("adapter_base"):
                self._weights_dir = base_path = Path(meta["adapter_base"])
                if not (base_path / "config.json").exists():
                    raise FileNotFoundError(f"{save_path} holds an adapter trained on the weights in {base_path}, "
                                            "which are gone; load that folder's save instead, or save with "
                                            "merged=True next time")
            log.info("loading a %s adapter onto %s", peft_config.peft_type, base_path)
            base = self._load_pretrained(base_path)
            if is_quantized(base):  # as the adapter transform does before training (QLoRA)
                from peft import prepare_model_for_kbit_training

                base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
            self.model = PeftModel.from_pretrained(base, str(weights), is_trainable=True)
        elif kind in ("merged", "full"):
            self.model = self._load_pretrained(weights)
            self._weights_dir = weights
        else:
            self.model = self._load_pretrained(self._base_path)
        self.model.eval()
        has_tokenizer = (weights / "tokenizer_config.json").exists() and (weights / "config.json").exists()
        tokenizer_dir = weights if has_tokenizer else self._base_path  # an adapter folder has no config.json
        self.tokenizer = loading.load_tokenizer(tokenizer_dir, params.trust_remote_code)
        self.trained = kind != "none"
        if not is_quantized(self.model):
            self.curr_device = torch.device("cpu")
        if hasattr(self, "encoder"):  # loaded into a built LLM: the tokenizer and device are new
            self._build_text_parts()
            self.to_device(self.target_device)


def saved_model_dir(path: str | Path) -> Path:
    """The folder :meth:`LLM.save` wrote, given it or a run folder of ``hfbridge train`` (``model/`` preferred to
    ``adapter/``)."""
    path = Path(path)
    for candidate in (path, path / "model", path / "adapter"):
        if (candidate / CONFIG_FILE).exists() and (candidate / META_FILE).exists():
            return candidate
    raise FileNotFoundError(f"{path} holds no saved LLM ({CONFIG_FILE} and {META_FILE}); give a folder written by "
                            "LLM.save or hfbridge train")


def load_llm(path: str | Path, device: str | torch.device | None = None, trust_remote_code: bool = False) -> LLM:
    """An :class:`LLM` from a saved folder (or a training run's folder), in a fresh process.

    ``trust_remote_code`` comes from the caller only: a saved folder's own ``model_parameters.trust_remote_code``
    is not obeyed (a folder someone hands you must not be able to run code by asking for it)."""
    folder = saved_model_dir(path)
    config = load_config(folder / CONFIG_FILE)
    if config.model_parameters.trust_remote_code and not trust_remote_code:
        log.warning("%s asks for trust_remote_code; it is off unless the caller turns it on "
                    "(--trust-remote-code)", folder / CONFIG_FILE)
    config.model_parameters.trust_remote_code = trust_remote_code
    meta = json.loads((folder / META_FILE).read_text())
    return LLM(config, random_seed=meta.get("random_seed", 42), device=device, weights_path=folder)

