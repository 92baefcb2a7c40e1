"""Preference data: pairs (``prompt``, ``chosen``, ``rejected``) and unpaired KTO examples (``prompt``,
``completion``, ``label``), checked, tokenized and batched for :class:`hfbridge.models.preference.HFPreferenceModel`.

Two record forms, told apart by the fields' types:

* strings: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``; the prompt is rendered as in the
  ``prompt_completion`` format (BOS when the tokenizer adds one), each completion is followed by EOS;
* conversations: ``{"chosen": [messages...], "rejected": [messages...]}`` sharing every turn but the last, which
  is the assistant's; or the prompt turns apart: ``{"prompt": [messages...], "chosen": [assistant message],
  "rejected": [assistant message]}``. Rendered with the chat template; the final assistant turn is scored, its
  end-of-turn token included.

KTO records hold ``prompt``, ``completion`` (a string, or a list with one assistant message) and ``label``
(``true``: desirable). A completion is scored after its prompt exactly as in a pair.

Each scored completion becomes a :class:`~hfbridge.data.formats.TokenizedSample` with labels on the completion's
tokens only, shifted once as everywhere in hfbridge. A batch of ``n`` pairs is ``2n`` such sequences, the chosen
first (sequence ``i``) then the rejected (sequence ``n + i``), padded one per row or packed padding-free; its
``sequence_ids`` say which sequence each position belongs to. Every pair is checked (fields, types, identical
chosen and rejected, shared prompt turns) before any model is loaded; a prompt that leaves no room for its
completion within ``max_length`` is an error naming the record.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hfbridge.data.collators import PaddedCollator
from hfbridge.data.datamodule import CausalLMDataModule, record_rows, resolve_format
from hfbridge.data.formats import (
    DataFormatError,
    TokenizedSample,
    _bos_ids,
    _encode,
    _eos_ids,
    check_record,
    render_chat,
    shift_for_causal_lm,
)
from hfbridge.data.packing import PackedCollator, best_fit_decreasing
from hfbridge.data.sources import DataSourceError
from hfbridge.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

PREFERENCE_FORMATS = ("preference", "kto")
PAIRS_KEY = "num_pairs"  # the pairs (or KTO examples) of a batch's whole optimizer step, stamped on every batch
CHOSEN_TOKENS_KEY = "num_chosen_tokens"  # the chosen completions' label tokens of the step (ORPO's NLL term)


@dataclass
class PreferenceExample:
    """A checked record: the prompt (a string, or the messages before the scored turn) and the completions
    (strings, or assistant messages). KTO examples have one completion and a ``desirable`` label."""

    prompt: str | list
    completions: tuple  # (chosen, rejected) or (completion,)
    desirable: bool | None = None
    where: str = ""

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class PreferenceSample:
    """A tokenized example: one shifted sequence per completion, plus what a KTO batch needs to pair its
    prompt with another example's completion (the unshifted prompt and completion tokens)."""

    sequences: tuple[TokenizedSample, ...]
    prompt_ids: list[int]
    completion_ids: tuple[list[int], ...]
    desirable: bool | None = None
    reference: tuple[float, ...] | None = None  # precomputed reference log-probabilities, one per sequence
    truncated: bool = False


def detect_preference_format(record: dict) -> str:
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "completion" in record and "label" in record:
        return "kto"
    raise DataFormatError(
        f"a preference record needs 'chosen' and 'rejected' (pairs) or 'prompt', 'completion' and 'label' (KTO); "
        f"got fields {sorted(record)}")


def _assistant(message, where: str) -> dict:
    if not isinstance(message, dict) or message.get("role") != "assistant":
        raise DataFormatError(f"{where}: the scored turn must be an assistant message, got {message!r:.80}")
    return message


def _check_messages(messages, where: str) -> None:
    check_record({"messages": messages}, "messages", where)


def _completion(value, where: str, prompt_is_chat: bool, field_name: str):
    """A completion as a string, or an assistant message (conversations)."""
    if isinstance(value, str):
        if prompt_is_chat:
            raise DataFormatError(f"{where}: '{field_name}' is a string but 'prompt' is a conversation; give the "
                                  f"assistant turn as a list with one message")
        return value
    if isinstance(value, list):
        if len(value) != 1:
            raise DataFormatError(f"{where}: '{field_name}' must hold exactly one assistant message after a "
                                  f"conversation 'prompt', got {len(value)}")
        return _assistant(value[0], f"{where}: {field_name}[0]")
    raise DataFormatError(f"{where}: field {field_name!r} must be a string or a list of messages, got "
                          f"{type(value).__name__}")


def parse_preference_record(record: dict, fmt: str, where: str) -> PreferenceExample:
    """Check one record of format ``preference`` or ``kto`` and return it in one shape."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: a record must be an object, got {type(record).__name__}")
    needed = ("chosen", "rejected") if fmt == "preference" else ("prompt", "completion", "label")
    missing = [f for f in needed if f not in record or record[f] is None]
    if missing:
        raise DataFormatError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                              f"({fmt} records need {', '.join(needed)})")
    if fmt == "kto":
        label = record["label"]
        if not isinstance(label, bool):
            raise DataFormatError(f"{where}: 'label' must be true (desirable) or false (undesirable), got {label!r}")
        prompt = record["prompt"]
        if isinstance(prompt, list):
            _check_messages(prompt + [{"role": "assistant", "content": "x"}], f"{where}: prompt")
        elif not isinstance(prompt, str):
            raise DataFormatError(f"{where}: 'prompt' must be a string or a list of messages")
        completion = _completion(record["completion"], where, isinstance(prompt, list), "completion")
        return PreferenceExample(prompt, (completion,), label, where)

    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataFormatError(f"{where}: 'chosen' and 'rejected' must both be strings or both conversations")
    prompt = record.get("prompt")
    if isinstance(chosen, str):
        if not isinstance(prompt, str):
            raise DataFormatError(f"{where}: string pairs need a string 'prompt'"
                                  + (" (missing)" if prompt is None else f", got {type(prompt).__name__}"))
    elif prompt is None:  # whole conversations that share every turn but the last
        for name, conv in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(conv, list) or not conv:
                raise DataFormatError(f"{where}: '{name}' must be a non-empty list of messages")
            _check_messages(conv, f"{where}: {name}")
            _assistant(conv[-1], f"{where}: {name}[-1]")
        if chosen[:-1] != rejected[:-1]:
            raise DataFormatError(f"{where}: 'chosen' and 'rejected' must share every turn before the last "
                                  "(the prompt); they differ earlier")
        prompt, chosen, rejected = list(chosen[:-1]), chosen[-1], rejected[-1]
        if not prompt:
            raise DataFormatError(f"{where}: the conversations have no prompt turn before the assistant's")
    else:
        if not isinstance(prompt, list):
            raise DataFormatError(f"{where}: 'prompt' must be a list of messages when 'chosen' is a conversation")
        _check_messages(prompt + [{"role": "assistant", "content": "x"}], f"{where}: prompt")
        chosen = _completion(chosen, where, True, "chosen")
        rejected = _completion(rejected, where, True, "rejected")
    if chosen == rejected:
        raise DataFormatError(f"{where}: 'chosen' and 'rejected' are identical, so the pair says nothing")
    return PreferenceExample(prompt, (chosen, rejected), None, where)


def load_preference_records(data, fmt: str = "auto", split: str | None = None) -> tuple[list[PreferenceExample], str]:
    """Read and check every record (a path, a list of dicts, or examples already checked); ``fmt``: ``auto``,
    ``preference`` or ``kto``."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(r, PreferenceExample) for r in data):
        kind = "kto" if data[0].desirable is not None else "preference"
        if fmt not in ("auto", kind):
            raise DataFormatError(f"the examples are {kind} examples, not {fmt}")
        return list(data), kind
    rows = record_rows(data, split)
    fmt = resolve_format(rows, fmt, detect_preference_format, PREFERENCE_FORMATS)
    examples = [parse_preference_record(record, fmt, where) for where, record in rows]
    if fmt == "kto" and len({e.desirable for e in examples}) < 2:
        log.warning("KTO data with only %s examples", "desirable" if examples[0].desirable else "undesirable")
    return examples, fmt


def _render(tokenizer, example: PreferenceExample, completion) -> tuple[list[int], list[int]]:
    """Unshifted token ids of the prompt and of one completion (with EOS, or the end-of-turn of the chat
    template), tokenized apart so every completion of a pair follows the same prompt tokens."""
    if not example.conversational:
        return _bos_ids(tokenizer) + _encode(tokenizer, example.prompt), _encode(tokenizer, completion) + _eos_ids(tokenizer)
    prompt_text = render_chat(tokenizer, example.prompt, add_generation_prompt=True)
    full = render_chat(tokenizer, [*example.prompt, completion])
    if not full.startswith(prompt_text):
        raise DataFormatError(f"{example.where}: the chat template does not render the prompt as a prefix of the "
                              "conversation, so the assistant turn cannot be located")
    return _encode(tokenizer, prompt_text), _encode(tokenizer, full[len(prompt_text):])


def scored_sequence(prompt_ids: list[int], completion_ids: list[int], max_length: int | None) -> TokenizedSample:
    """The shifted sequence of a prompt and a completion, labels on the completion; cut to ``max_length``."""
    input_ids, labels = shift_for_causal_lm(prompt_ids + completion_ids,
                                            [False] * len(prompt_ids) + [True] * len(completion_ids))
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedSample(input_ids, labels, truncated)


def tokenize_preference_example(tokenizer, example: PreferenceExample, max_length: int | None = None) -> PreferenceSample:
    """Tokenize an example; a prompt that leaves no completion token within ``max_length`` is an error."""
    rendered = [_render(tokenizer, example, c) for c in example.completions]
    prompt_ids = rendered[0][0]
    if max_length is not None and len(prompt_ids) >= max_length:
        raise DataFormatError(
            f"{example.where}: the prompt is {len(prompt_ids)} tokens, which leaves no completion token within "
            f"max_length={max_length}; raise --max-length or shorten the prompt")
    sequences = tuple(scored_sequence(prompt_ids, ids, max_length) for _, ids in rendered)
    return PreferenceSample(sequences, prompt_ids, tuple(ids for _, ids in rendered), example.desirable,
                            truncated=any(s.truncated for s in sequences))


@dataclass
class PreferenceCollator:
    """Batch preference samples: every sequence of the batch (pairs: the chosen ones, then the rejected ones),
    padded one per row or packed padding-free, with ``sequence_ids``; ``reference_logps`` when precomputed;
    for KTO also ``desirable`` and the ``kl`` batch (each prompt with the previous example's completion)."""

    pad_token_id: int
    packed: PackedCollator | None = None
    max_length: int | None = None
    share_prompt: bool = False  # pairs: each prompt once, its completions beside it (needs ``packed``)

    def rows(self, sequences: Sequence[TokenizedSample]) -> dict[str, torch.Tensor]:
        if self.packed is not None:
            self.packed.sequence_ids = True
            return self.packed(sequences)
        return PaddedCollator(self.pad_token_id, sequence_ids=True)(sequences)

    def __call__(self, samples: Sequence[PreferenceSample]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        width = len(samples[0].sequences)
        if self.share_prompt and self.packed is not None and width > 1:
            batch = shared_prompt_rows(samples, self.pad_token_id, self.packed.pack_length)
        else:
            sequences = [s.sequences[k] for k in range(width) for s in samples]  # chosen block, then rejected block
            batch = self.rows(sequences)
        batch[PAIRS_KEY + "_micro"] = torch.tensor(len(samples), dtype=torch.long)
        if all(s.reference is not None for s in samples):
            batch["reference_logps"] = torch.tensor(
                [s.reference[k] for k in range(width) for s in samples], dtype=torch.float32)
        if samples[0].desirable is not None:  # KTO
            batch["desirable"] = torch.tensor([bool(s.desirable) for s in samples])
            n = len(samples)
            kl = [scored_sequence(samples[i].prompt_ids, samples[(i - 1) % n].completion_ids[0], self.max_length)
                  for i in range(n)]
            batch["kl"] = self.rows(kl)
        return batch


PREFIX_ID = -2  # sequence_ids of a shared prompt's positions (padding is -1)


def shared_prompt_rows(samples: Sequence[PreferenceSample], pad_token_id: int, pack_length: int | None = None) -> dict:
    """Rows in which each example's prompt appears once, followed by each of its completions, packed padding-free.

    A completion's positions attend to its own prompt and to its own earlier positions, never to the other
    completion (a 4-D ``attention_mask``, True where attention is allowed), and continue the prompt's position ids,
    so every completion is computed exactly as if it followed its prompt alone; the prompt's activations are
    computed once for both. The last prompt token starts each completion's branch: its label is that completion's
    first token. Groups (one example each) are packed into rows of at most ``pack_length`` positions (``None``: the
    longest group) by best-fit decreasing; padding attends only to itself. ``sequence_ids``: sequence ``k * n + i``
    for completion ``k`` of example ``i``, :data:`PREFIX_ID` for shared prompt positions, -1 for padding.
    """
    n = len(samples)
    groups = []
    for i, sample in enumerate(samples):
        shared = max(len(sample.prompt_ids) - 1, 0)
        prefix = sample.sequences[0].input_ids[:shared]
        branches = []
        for k, seq in enumerate(sample.sequences):
            if seq.input_ids[:shared] != prefix or any(t != IGNORE_INDEX for t in seq.labels[:shared]):
                raise ValueError("the completions of an example do not share its prompt tokens")
            branches.append((k * n + i, seq.input_ids[shared:], seq.labels[shared:]))
        groups.append((prefix, branches))
    lengths = [len(prefix) + sum(len(ids) for _, ids, _ in branches) for prefix, branches in groups]
    rows = best_fit_decreasing(lengths, pack_length or max(lengths))
    width = max(sum(lengths[g] for g in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    sequence_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    mask = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    for r, row in enumerate(rows):
        at = 0
        for g in row:
            prefix, branches = groups[g]
            s0, s = at, len(prefix)
            input_ids[r, s0 : s0 + s] = torch.tensor(prefix, dtype=torch.long)
            position_ids[r, s0 : s0 + s] = torch.arange(s)
            sequence_ids[r, s0 : s0 + s] = PREFIX_ID
            mask[r, 0, s0 : s0 + s, s0 : s0 + s] = torch.ones(s, s, dtype=torch.bool).tril()
            at += s
            for seq_id, ids, labs in branches:
                m = len(ids)
                input_ids[r, at : at + m] = torch.tensor(ids, dtype=torch.long)
                labels[r, at : at + m] = torch.tensor(labs, dtype=torch.long)
                position_ids[r, at : at + m] = torch.arange(s, s + m)
                sequence_ids[r, at : at + m] = seq_id
                mask[r, 0, at : at + m, s0 : s0 + s] = True
                mask[r, 0, at : at + m, at : at + m] = torch.ones(m, m, dtype=torch.bool).tril()
                at += m
        for p in range(at, width):  # padding: itself only (a row of the mask with nothing allowed is NaN)
            mask[r, 0, p, p] = True
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask,
            "sequence_ids": sequence_ids}


def shared_prompt_is_exact(model, rtol: float | None = None) -> tuple[bool, str]:
    """Whether ``model`` computes two completions that share one prompt (:func:`shared_prompt_rows`: a 4-D mask
    and continued position ids) exactly as each after its prompt alone; checked on random tokens, eval mode."""
    from hfbridge._shared import eager

    weight = next(model.parameters())
    vocab = model.get_input_embeddings().weight.shape[0] if hasattr(model, "get_input_embeddings") else 100
    g = torch.Generator().manual_seed(0)
    prompt, chosen, rejected = (torch.randint(0, vocab, (k,), generator=g).tolist() for k in (5, 3, 4))
    sample = PreferenceSample(
        tuple(scored_sequence(prompt, c, None) for c in (chosen, rejected)), prompt, (chosen, rejected))
    batch = shared_prompt_rows([sample], 0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), eager():
            inputs = {k: batch[k].to(weight.device) for k in ("input_ids", "position_ids", "attention_mask")}
            shared = model(**inputs, use_cache=False).logits.float()[0]
            alone = [model(input_ids=torch.tensor([seq.input_ids], device=weight.device), use_cache=False)
                     .logits.float()[0] for seq in sample.sequences]
    except Exception as e:  # a model that cannot take a 4-D mask keeps one row per sequence
        return False, f"the model does not take a custom 4-D attention mask ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    ids = batch["sequence_ids"][0]
    tol = rtol if rtol is not None else (1e-4 if weight.dtype == torch.float32 else 3e-2)
    for k, logits in enumerate(alone):
        ours = torch.cat([shared[ids == PREFIX_ID], shared[ids == k]])
        err = float((ours - logits).abs().max())
        if err > tol * float(logits.abs().max().clamp(min=1.0)):
            return False, f"a completion beside another differs from the completion alone (off by {err:.3g})"
    return True, "completions beside a shared prompt equal each completion alone"


def _pairs_in(batch: dict) -> int:
    return int(batch[PAIRS_KEY + "_micro"])


def _chosen_tokens_in(batch: dict) -> int:
    n = _pairs_in(batch)
    ids, labels = batch["sequence_ids"], batch["labels"]
    return int(((ids >= 0) & (ids < n) & (labels != -100)).sum())


class PreferenceDataModule(CausalLMDataModule):
    """:class:`~hfbridge.CausalLMDataModule` for preference records (see the module docstring).

    Same arguments; ``data_format`` is ``auto``, ``preference`` or ``kto``. ``packing`` packs the chosen and
    rejected sequences of each micro-batch padding-free (``"auto"``: when the model is checked to keep packed
    sequences apart). Each batch is stamped with the pairs (``num_pairs``) and chosen label tokens
    (``num_chosen_tokens``) of its whole optimizer step, so the loss is normalised over the step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if kwargs.get("pack_length") is None:
            # rows as long as the micro-batch's longest sequence: packing then removes padding without making the
            # attention of a row (quadratic in its length, block-diagonal mask) longer than padding would
            self.packed_collator.pack_length = None

    def _load_records(self, data, data_format: str):
        return load_preference_records(data, data_format)

    def _tokenize(self, records: list[PreferenceExample], split: str) -> list[PreferenceSample]:
        samples = [tokenize_preference_example(self.tokenizer, r, self.max_length) for r in records]
        truncated = sum(s.truncated for s in samples)
        if truncated:
            log.warning("%s: %d of %d examples had a completion cut at max_length=%s tokens", split, truncated,
                        len(samples), self.max_length)
        if not samples:
            raise DataSourceError(f"{split}: no preference example")
        return samples

    def use_prompt_sharing(self) -> bool:
        """Whether pairs share their prompt in a row (:func:`shared_prompt_rows`): when packing is on and the
        model is checked to compute a completion beside another exactly as alone (decided once)."""
        decided = getattr(self, "_sharing_decision", None)
        if decided is None:
            decided, model = False, self._model()
            if self.use_packing() and model is not None:
                decided, reason = shared_prompt_is_exact(model)
                log.info("prompt sharing: %s (%s)", "on" if decided else "off", reason)
            self._sharing_decision = decided
        return decided

    def _collate(self):
        packed = self.packed_collator if self.use_packing() else None
        return PreferenceCollator(self.pad_token_id, packed, self.max_length, share_prompt=self.use_prompt_sharing())

    def _step_counts(self):
        return {PAIRS_KEY: _pairs_in, CHOSEN_TOKENS_KEY: _chosen_tokens_in}

    def all_samples(self) -> list[PreferenceSample]:
        """Training then validation samples (tokenized on first use)."""
        self.setup("fit")
        return list(self.train_samples) + list(self.val_samples or [])

    def reference_batches(self, batch_size: int | None = None):
        """Padded batches of every sample, in order, for precomputing reference log-probabilities."""
        samples = self.all_samples()
        collate = PreferenceCollator(self.pad_token_id, None, self.max_length)
        size = batch_size or self.batch_size
        for start in range(0, len(samples), size):
            chunk = samples[start : start + size]
            yield chunk, collate(chunk)
