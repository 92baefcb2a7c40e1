"""Preference training as Lightning modules: DPO and its family (IPO, hinge, SimPO), ORPO, KTO
(:class:`HFPreferenceModel`) and reward models (:class:`HFRewardModel`), on the same module, loading, adapters,
parallel plan and step normalisation as :class:`~hfbridge.HFAutoModelForCausalLM`.

Batches come from :class:`hfbridge.data.preference.PreferenceDataModule`: the ``2n`` sequences of ``n`` pairs
(chosen first, then rejected) in padded or packed rows, ``sequence_ids`` saying which sequence each position is,
and the pairs of the whole optimizer step. Sequence log-probabilities are summed over each completion's label
tokens from the backbone's hidden states and the output head, a chunk of positions at a time
(:func:`hfbridge.losses.sequence_logprobs`): the ``tokens x vocabulary`` logits never exist.

The loss of an optimizer step is the mean over its pairs (all micro-batches, all data-parallel ranks), so it does
not depend on how the step is split; ORPO's NLL term is normalised by the chosen label tokens of the step.

The reference model (DPO, IPO, hinge, KTO):

* ``adapter``: the policy with its adapter disabled (peft), no second copy: the default with an adapter;
* ``copy``: a frozen copy of the model as loaded: the default for full fine-tuning;
* ``precomputed``: reference log-probabilities of every training and validation sample computed once, before
  training (with the adapter disabled, or by the model as loaded), and reused every epoch;
* ``none``: SimPO and ORPO, which need none.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hfbridge.losses import (
    IGNORE_INDEX,
    bradley_terry_loss,
    kto_losses,
    pair_losses,
    sequence_logprobs,
)
from hfbridge.models.causal_lm import HFAutoModelForCausalLM
from hfbridge.models.chunked_loss import split_head
from hfbridge.models.peft_adapters import is_peft_model

log = logging.getLogger(__name__)

PAIRED_METHODS = ("dpo", "ipo", "hinge", "simpo", "orpo")
METHODS = (*PAIRED_METHODS, "kto")
REFERENCE_FREE = ("simpo", "orpo")
REFERENCES = ("auto", "adapter", "copy", "precomputed", "none")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "hinge": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}
PAIRS_KEY, CHOSEN_TOKENS_KEY, MICRO_PAIRS_KEY = "num_pairs", "num_chosen_tokens", "num_pairs_micro"
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def check_preference_options(method: str, beta: float | None = None, label_smoothing: float = 0.0,
                             reference: str = "auto", adapter: bool | None = None, mesh: bool = False,
                             load_in_4bit: bool = False) -> None:
    """The options' errors, before anything loads (``adapter``/``mesh``/``load_in_4bit``: what the run will
    have, when known)."""
    if method not in METHODS:
        raise ValueError(f"method: unknown preference method {method!r}; choose one of {', '.join(METHODS)}")
    if reference not in REFERENCES:
        raise ValueError(f"reference: unknown reference {reference!r}; choose one of {', '.join(REFERENCES)}")
    if method in REFERENCE_FREE and reference not in ("auto", "none"):
        raise ValueError(f"{method} uses no reference model; leave reference at 'auto' (got {reference!r})")
    if method not in REFERENCE_FREE and reference == "none":
        raise ValueError(f"{method} needs a reference model: choose adapter, copy or precomputed")
    if method == "kto" and reference == "precomputed":
        raise ValueError("kto estimates its KL baseline on mismatched prompt/completion pairs of each "
                         "micro-batch, which cannot be precomputed: use reference adapter or copy")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if beta is not None and not beta > 0:
        raise ValueError(f"beta must be above 0, got {beta}")
    if method in REFERENCE_FREE:
        return
    resolved = reference if reference != "auto" else (None if adapter is None else "adapter" if adapter else "copy")
    if resolved == "adapter" and adapter is False:
        raise ValueError("reference 'adapter' needs an adapter: train with LoRA (not --full), or use reference "
                         "copy or precomputed")
    if resolved == "copy" and mesh:
        raise ValueError("a frozen reference copy is not sharded: on a device mesh train an adapter (reference "
                         "adapter) or use reference precomputed")
    if resolved == "copy" and load_in_4bit:
        raise ValueError("4-bit models are trained with an adapter: use reference adapter (the default with LoRA)")


def sequence_logps(model: nn.Module, batch: dict, num_sequences: int, split=None, chunk_size: int = 512):
    """Summed completion log-probabilities of every sequence of a preference ``batch`` under ``model``, and their
    label-token counts: from the backbone's hidden states and the head when ``split`` (``split_head(model)[0]``)
    is given, without the full logits; else from the model's logits."""
    labels, ids = batch["labels"], batch["sequence_ids"]
    if split is not None:
        hidden = split.hidden_states(_inputs(batch))
        return sequence_logprobs(labels, ids, num_sequences, hidden=hidden, weight=split.head.weight,
                                 bias=split.head.bias, chunk_size=chunk_size)
    logits = model(**_inputs(batch), use_cache=False).logits
    return sequence_logprobs(labels, ids, num_sequences, logits=logits)


def reward_scores(model: nn.Module, batch: dict) -> torch.Tensor:
    """Rewards of a sequence-classification model for each padded row of ``batch``."""
    if "position_ids" in batch and "attention_mask" not in batch:
        raise ValueError("a reward model scores padded rows, not packed ones: use packing off")
    return model(**_inputs(batch), use_cache=False).logits[:, 0].float()


def _with_means(out: dict) -> dict:
    """``out`` with each of its ``metric_sums`` as a batch mean under its own name."""
    out.update({k: v / c for k, (v, c) in out["metric_sums"].items() if c})
    return out


class _StepMetrics:
    """Sums of per-pair metrics over an optimizer step's micro-batches, logged as means once the step is
    complete (over all data-parallel ranks)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.pairs = 0

    def add(self, name: str, total: float, count: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(total)
        self.counts[name] = self.counts.get(name, 0.0) + float(count)


class _PreferenceSteps:
    """What preference modules share: the step normalisation and logging of per-pair losses and metrics."""

    def _scaled_step_loss(self, batch: dict, out: dict) -> torch.Tensor:
        """The micro-batch's share of the optimizer step's loss, scaled as Lightning and data-parallel
        averaging need (see :meth:`HFAutoModelForCausalLM._token_normalised_loss`)."""
        n_micro = out["n"]
        n_step = batch.get(PAIRS_KEY)
        if n_step is None:
            dp_size, _ = self._dp_size_and_group()
            accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
            if accumulate > 1 or dp_size > 1:
                raise ValueError("preference batches must say how many pairs their optimizer step has "
                                 f"('{PAIRS_KEY}'): use hfbridge.data.preference.PreferenceDataModule")
            return out["loss"]
        pairs_step, tokens_step = self._dp_sum(int(n_step), int(batch.get(CHOSEN_TOKENS_KEY, 0)))
        scale = self._scale()
        loss = out["pair_loss_sum"] / max(pairs_step, 1.0)
        if "nll_sum" in out:
            loss = loss + out["nll_sum"] / max(tokens_step, 1.0)
        self._accumulate_metrics(out, int(n_step), n_micro)
        return loss * scale

    def _scale(self) -> float:
        dp_size, _ = self._dp_size_and_group()
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return float(dp_size * accumulate)

    def _accumulate_metrics(self, out: dict, n_step: int, n_micro: int) -> None:
        if self._trainer is None:
            return
        step = getattr(self, "_pref_step", None) or _StepMetrics()
        self._pref_step = step
        for name, (total, count) in out["metric_sums"].items():
            step.add(name, total, count)
        step.add("train_loss", float(out["pair_loss_sum"].detach()), n_micro)
        if "nll_sum" in out:
            step.add("nll_loss", float(out["nll_sum"].detach()), float(out["chosen_tokens"]))
        step.pairs += n_micro
        if step.pairs >= n_step:
            names = sorted(step.sums)
            totals = self._dp_sum(*[step.sums[k] for k in names], *[step.counts[k] for k in names])
            sums, counts = totals[: len(names)], totals[len(names):]
            values = {k: s / max(c, 1.0) for k, s, c in zip(names, sums, counts)}
            if "nll_loss" in values:  # ORPO: the step loss is the pair mean plus the NLL per chosen token
                values["train_loss"] += values["nll_loss"]
            for name, value in values.items():
                self.log(name, value, prog_bar=name == "train_loss", on_step=True, on_epoch=False)
            self._pref_step = None
        self._log_lr()

    def on_train_start(self) -> None:
        super().on_train_start()
        self._pref_step = None

    def training_step(self, batch: dict, batch_idx: int | None = None) -> torch.Tensor:
        """The loss of one micro-batch as its share of the optimizer step's mean over pairs (see the module
        docstring); logs ``train_loss``, the method's rewards, margins, accuracies and log-probabilities (TRL's
        names) for the whole optimizer step, and ``lr``."""
        return self._scaled_step_loss(batch, self.preference_outputs(batch))

    def validation_step(self, batch: dict, batch_idx: int = 0) -> torch.Tensor:
        """``val_loss`` and ``val_<metric>`` for every training metric, averaged over all validation pairs."""
        out = self.preference_outputs(batch)
        if self._trainer is not None:
            n = max(out["n"], 1)
            self.log("val_loss", out["loss"], prog_bar=True, on_step=False, on_epoch=True, batch_size=n,
                     sync_dist=True)
            for name, (total, count) in out["metric_sums"].items():
                if count:
                    self.log(f"val_{name}", total / count, on_step=False, on_epoch=True, batch_size=int(count),
                             sync_dist=True)
        return out["loss"]

    def batch_token_counts(self, batch: dict) -> tuple[int, int]:
        """``(tokens, label tokens)`` of a batch, for throughput."""
        labels = batch["labels"]
        if "sequence_ids" in batch:  # -1: padding
            tokens = int((batch["sequence_ids"] != -1).sum())
        else:
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(labels.numel())
        return tokens, int((labels != IGNORE_INDEX).sum())


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    n = chosen_rewards.numel()
    margins = chosen_rewards - rejected_rewards
    return {
        "rewards/chosen": (float(chosen_rewards.sum()), n),
        "rewards/rejected": (float(rejected_rewards.sum()), n),
        "rewards/margins": (float(margins.sum()), n),
        "rewards/accuracies": (float((chosen_rewards > rejected_rewards).float().sum()), n),
        "logps/chosen": (float(chosen_logps.detach().sum()), n),
        "logps/rejected": (float(rejected_logps.detach().sum()), n),
    }


class HFPreferenceModel(_PreferenceSteps, HFAutoModelForCausalLM):
    """A causal LM trained on preferences (see the module docstring).

    Args (beside every :class:`~hfbridge.HFAutoModelForCausalLM` argument):
        method: ``dpo`` (sigmoid loss), ``ipo``, ``hinge``, ``simpo`` (reference-free, length-normalised),
            ``orpo`` (NLL of the chosen plus an odds-ratio term, no reference) or ``kto`` (unpaired examples).
        beta: the method's temperature (``None``: 0.1; 2.0 for SimPO). For ORPO it is the odds-ratio weight
            (TRL's ``beta``, the paper's lambda).
        label_smoothing: DPO's and SimPO's conservative smoothing (0 to 0.5).
        reference: ``auto``, ``adapter``, ``copy``, ``precomputed`` or ``none`` (see the module docstring).
        simpo_gamma: SimPO's target reward margin.
        desirable_weight / undesirable_weight: KTO's weights of the two kinds of example.
    """

    def __init__(self, *, method: str = "dpo", beta: float | None = None, label_smoothing: float = 0.0,
                 reference: str = "auto", simpo_gamma: float = 0.5, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, **kwargs):
        check_preference_options(method, beta, label_smoothing, reference)
        beta = DEFAULT_BETA[method] if beta is None else float(beta)
        if kwargs.get("loss_fn") is not None:
            raise ValueError("preference methods define their own loss; loss_fn is for next-token training")
        super().__init__(**kwargs)
        self.method, self.beta, self.label_smoothing = method, beta, label_smoothing
        self.reference = reference
        self.simpo_gamma, self.desirable_weight, self.undesirable_weight = simpo_gamma, desirable_weight, undesirable_weight
        self._ref_split = None

    # ---------------------------------------------------------------------------------------------- reference
    @property
    def reference_mode(self) -> str:
        """The reference actually used: ``auto`` resolved (needs the model: after ``configure_model``)."""
        if self.method in REFERENCE_FREE:
            return "none"
        if self.reference != "auto":
            return self.reference
        if self.model is None:
            raise RuntimeError("the reference is resolved against the model: call configure_model() first")
        return "adapter" if is_peft_model(self.model) else "copy"

    def configure_model(self) -> None:
        had_model = self.model is not None
        super().configure_model()
        if had_model:
            return
        check_preference_options(self.method, self.beta, self.label_smoothing, self.reference,
                                 adapter=is_peft_model(self.model), mesh=self._device_mesh is not None,
                                 load_in_4bit=self.load_in_4bit)
        if self.reference_mode == "copy":
            ref = copy.deepcopy(self.model).eval().requires_grad_(False)
            object.__setattr__(self, "_ref", ref)  # not a submodule: not trained, not saved, not in checkpoints

    def _reference_model(self) -> nn.Module | None:
        return self.__dict__.get("_ref")

    @contextmanager
    def _as_reference(self) -> Iterator[nn.Module]:
        """The reference model: the frozen copy, or the policy with its adapter disabled."""
        ref = self._reference_model()
        if ref is not None:
            if next(ref.parameters()).device != self.device:
                ref.to(self.device)
            yield ref
        elif is_peft_model(self.model):
            with self.model.disable_adapter():
                yield self.model
        else:  # precomputing before any step: the model as loaded
            yield self.model

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.reference_mode == "precomputed":
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "reference_batches"):
                raise ValueError("reference 'precomputed' needs a PreferenceDataModule passed to Trainer.fit")
            if self.trainer.ckpt_path and not is_peft_model(self.model):
                # The reference is the model as loaded: a resumed run computes it here, before the checkpoint is
                # restored, which Lightning does after this hook for strategies that restore after setup
                # (hfbridge's mesh strategy, which every resumable run uses). Set now, it was restored already.
                raise ValueError(f"reference 'precomputed' of full fine-tuning cannot resume under "
                                 f"{type(self.trainer.strategy).__name__}: it restores the checkpoint before the "
                                 "reference is computed; resume under hfbridge's MeshParallelStrategy "
                                 "(--checkpoint-dir)")
            self.precompute_reference(datamodule)

    @torch.no_grad()
    def precompute_reference(self, datamodule) -> int:
        """Compute the reference log-probabilities of every training and validation sample once (stored on the
        samples, so every epoch's batches carry them). Returns the number of samples."""
        was_training = self.model.training
        self.model.eval()
        count = 0
        try:
            with self._as_reference() as ref:
                for chunk, batch in datamodule.reference_batches():
                    batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    n_seq = len(chunk) * len(chunk[0].sequences)
                    logps, _ = self._logps(ref, batch, n_seq)
                    width = len(chunk[0].sequences)
                    values = logps.view(width, len(chunk)).T.tolist()
                    for sample, row in zip(chunk, values):
                        sample.reference = tuple(row)
                    count += len(chunk)
        finally:
            self.model.train(was_training)
        log.info("reference log-probabilities precomputed for %d samples", count)
        return count

    # ---------------------------------------------------------------------------------------------- log-probs
    def _head_split_of(self, model: nn.Module):
        if model is self.model:
            return self._split()
        if not self.chunked_loss:
            return None
        if self._ref_split is None or self._ref_split[0] is not model:
            self._ref_split = (model, split_head(model)[0])
        return self._ref_split[1]

    def _logps(self, model: nn.Module, batch: dict, n_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed label-token log-probabilities of each sequence of ``batch`` under ``model``, and their counts."""
        chunk = 512 if self.chunked_loss is True else int(self.chunked_loss or 512)
        return sequence_logps(model, batch, n_seq, self._head_split_of(model), chunk)

    def _reference_logps(self, batch: dict, n_seq: int) -> torch.Tensor | None:
        if self.reference_mode == "none":
            return None
        if "reference_logps" in batch:
            return batch["reference_logps"].to(self.device)
        if self.reference_mode == "precomputed":
            raise ValueError("reference 'precomputed': this batch has no reference_logps (they are computed in "
                             "on_fit_start from a PreferenceDataModule, or by precompute_reference(datamodule))")
        with torch.no_grad(), self._as_reference() as ref:
            return self._logps(ref, batch, n_seq)[0]

    # ---------------------------------------------------------------------------------------------- losses
    def preference_outputs(self, batch: dict) -> dict:
        """Loss and metrics of one batch: ``loss`` (the batch's own mean), ``pair_loss_sum`` (and ``nll_sum``
        for ORPO) for step normalisation, ``n`` pairs (or KTO examples), and ``metric_sums``
        (``{name: (sum, count)}``); also the metrics' batch means under their TRL names."""
        if self.method == "kto":
            return self._kto_outputs(batch)
        n = int(batch[MICRO_PAIRS_KEY]) if MICRO_PAIRS_KEY in batch else (int(batch["sequence_ids"].max()) + 1) // 2
        # the reference first: its forward's memory is freed before the policy's activations are built up
        ref = self._reference_logps(batch, 2 * n)
        logps, counts = self._logps(self.model, batch, 2 * n)
        chosen, rejected = logps[:n], logps[n:]
        ref_c, ref_r = (ref[:n], ref[n:]) if ref is not None else (None, None)
        losses, chosen_rewards, rejected_rewards = pair_losses(
            self.method, chosen, rejected, ref_c, ref_r, counts[:n], counts[n:], beta=self.beta,
            label_smoothing=self.label_smoothing, gamma=self.simpo_gamma)
        out = {"n": n, "pair_loss_sum": losses.sum(), "loss": losses.mean()}
        metrics = _pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
        if self.method == "orpo":
            chosen_tokens = counts[:n].sum()
            out["nll_sum"] = -chosen.sum()
            out["chosen_tokens"] = float(chosen_tokens)
            out["loss"] = out["loss"] + out["nll_sum"] / chosen_tokens.clamp(min=1)
            ratio = losses.detach() / -self.beta  # log sigma(log odds)
            metrics["log_odds_ratio"] = (float(ratio.sum()), n)
        out["metric_sums"] = metrics
        return _with_means(out)

    def _kto_outputs(self, batch: dict) -> dict:
        desirable = batch["desirable"].bool()
        n = desirable.numel()
        ref = self._reference_logps(batch, n)
        with torch.no_grad():  # the KL baseline: each prompt with another example's completion
            kl_batch = batch["kl"]
            policy_kl, _ = self._logps(self.model, kl_batch, n)
            with self._as_reference() as ref_model:
                ref_kl, _ = self._logps(ref_model, kl_batch, n)
            (kl_sum,) = self._dp_sum(float((policy_kl - ref_kl).sum()))
            (kl_count,) = self._dp_sum(n)
            kl = torch.tensor(max(kl_sum / max(kl_count, 1.0), 0.0), device=ref.device)
        logps, _ = self._logps(self.model, batch, n)
        losses, rewards = kto_losses(logps, ref, desirable, kl, self.beta, self.desirable_weight,
                                     self.undesirable_weight)
        good, bad = rewards[desirable], rewards[~desirable]
        metrics = {
            "rewards/chosen": (float(good.sum()), good.numel()),
            "rewards/rejected": (float(bad.sum()), bad.numel()),
            "logps/chosen": (float(logps.detach()[desirable].sum()), good.numel()),
            "logps/rejected": (float(logps.detach()[~desirable].sum()), bad.numel()),
            "kl": (float(kl) * n, n),
        }
        return _with_means({"n": n, "pair_loss_sum": losses.sum(), "loss": losses.mean(), "metric_sums": metrics})


class _SequenceClassificationAuto:
    """``AutoModelForSequenceClassification`` with one output: a reward."""

    @staticmethod
    def from_pretrained(path, **kwargs):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)

    @staticmethod
    def from_config(config, **kwargs):
        from transformers import AutoModelForSequenceClassification

        config.num_labels = 1
        return AutoModelForSequenceClassification.from_config(config, **kwargs)


class HFRewardModel(_PreferenceSteps, HFAutoModelForCausalLM):
    """A reward model: the causal LM's backbone with a one-output sequence-scoring head (transformers'
    ``AutoModelForSequenceClassification``, pooled at the last non-padding token), trained on pairs with the
    Bradley-Terry loss ``-log σ(r_chosen - r_rejected)``. With an adapter the head is trained in full
    (peft's sequence-classification task). Padded batches only: the score pools one row per sequence."""

    def __init__(self, **kwargs):
        transform = kwargs.get("model_transform")
        if transform is not None and dataclasses.is_dataclass(transform) and hasattr(transform, "extra"):
            kwargs["model_transform"] = dataclasses.replace(transform, extra={**transform.extra, "task_type": "SEQ_CLS"})
        kwargs.setdefault("chunked_loss", False)
        super().__init__(**kwargs)
        self.method = "reward"
        self.chunked_loss = False

    def _load_model(self, auto_class=None, model_name=None) -> nn.Module:
        model = super()._load_model(auto_class or _SequenceClassificationAuto, model_name)
        if getattr(model.config, "pad_token_id", None) is None and self._tokenizer is not None:
            model.config.pad_token_id = self._tokenizer.pad_token_id
        elif getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def preference_outputs(self, batch: dict) -> dict:
        scores = reward_scores(self.model, batch)
        n = scores.numel() // 2
        chosen, rejected = scores[:n], scores[n:]
        losses = bradley_terry_loss(chosen, rejected)
        metrics = {
            "rewards/chosen": (float(chosen.detach().sum()), n),
            "rewards/rejected": (float(rejected.detach().sum()), n),
            "rewards/margins": (float((chosen - rejected).detach().sum()), n),
            "rewards/accuracies": (float((chosen > rejected).float().sum()), n),
        }
        return _with_means({"n": n, "pair_loss_sum": losses.sum(), "loss": losses.mean(), "metric_sums": metrics})


