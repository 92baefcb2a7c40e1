"""The independent reference for preference training: one batch through TRL's own ``DPOTrainer`` (TRL 1.16).

How TRL 1.16 builds a DPO batch (``DPOTrainer._prepare_dataset`` and ``DataCollatorForPreference``)
===================================================================================================

Records. ``{"prompt", "chosen", "rejected"}``, each either a string (the *standard* form) or a list of messages
(the *conversational* form: ``prompt`` = the messages before the answer, ``chosen``/``rejected`` = ``[{"role":
"assistant", "content": ...}]``). A record without ``prompt`` (two whole conversations) first has its prompt cut
off as the longest common prefix of ``chosen`` and ``rejected`` (``trl.data_utils.extract_prompt``).

Standard (string) form.
  1. EOS: ``tokenizer.eos_token`` (the *string*, e.g. ``"<|im_end|>"``) is appended to ``chosen`` and to
     ``rejected`` unless the string already ends with it. Nothing is appended to the prompt.
  2. Three tokenizer calls, each with the tokenizer's default ``add_special_tokens=True`` (so a BOS comes first
     exactly when the tokenizer's post-processor adds one: Llama-2/3 tokenizers do; SmolLM2's, Qwen's and
     hfbridge's tiny tokenizer do not): ``tok(prompt)``, ``tok(prompt + chosen)``, ``tok(prompt + rejected)``.
     The strings are concatenated with no separator and tokenized *together*, so a token may merge across the
     boundary; the EOS string is matched as its special token (one id).
  3. ``prompt_len = min(common_prefix(tok(prompt), tok(prompt+chosen)), common_prefix(tok(prompt),
     tok(prompt+rejected)))``: the prompt ids are ``tok(prompt)[:prompt_len]``, the chosen ids
     ``tok(prompt+chosen)[prompt_len:]`` and the rejected ids ``tok(prompt+rejected)[prompt_len:]``. When the
     prompt's last tokens merge with the completion (a prompt ending in a space, e.g. ``"Date: "`` + ``"Monday"``
     gives ``"Date:" | " Monday"``), the prompt is cut at the divergence (TRL warns once) and the rest of the
     joint tokenization, merged token included, is completion.
Conversational form.
  1. No EOS is appended: the chat template's own end of turn is.
  2. ``tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)`` for the prompt and
     ``apply_chat_template(prompt + chosen)`` / ``(prompt + rejected)`` (no generation prompt) for the full
     sequences; ``apply_chat_template`` adds no special tokens beyond what the template writes (a BOS only if the
     template renders one). Same ``common_prefix`` split as above.
  3. So the completion is everything the template renders after the generation prompt, end-of-turn tokens
     included: with ChatML (SmolLM2, the tiny tokenizer) ``content + "<|im_end|>" + "\\n"``, the trailing newline
     token scored too.
Truncation. ``max_length`` (default 1024) keeps the first ``max_length`` tokens of each prompt+completion
  (``truncation_mode="keep_start"``); a record whose prompt alone has ``>= max_length`` tokens is dropped.
Batch. ``input_ids`` = the ``n`` prompt+chosen rows, then the ``n`` prompt+rejected rows (chosen first), each
  right-padded with ``pad_token_id`` to the longest of all ``2n``; ``attention_mask`` 1 on real tokens;
  ``completion_mask`` 1 on the completion tokens. No packing (``padding_free=True`` warns and falls back to
  padding in 1.16).
Scored tokens. The label of position ``t`` is token ``t+1``; a token is scored iff its ``completion_mask`` is 1
  (``labels = input_ids`` with ``-100`` outside the completion). The per-sequence log-probability is the SUM of
  the scored tokens' log-probabilities (no averaging), computed by TRL's fused chunked LM head (no full logits;
  on CPU it scores every position and masks). ``chosen_logps, rejected_logps = logps.chunk(2)``.
Reference. ``ref_model`` if given (in ``torch.no_grad``); with a ``peft_config`` and no ``ref_model`` the same
  model with its adapters disabled; with ``precompute_ref_log_probs`` the same sums computed once before training.
Losses (``delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)``, each averaged over
  the pairs of the batch):
  ``sigmoid``: ``-logsigmoid(beta * delta)``; label_smoothing is IGNORED by ``sigmoid`` in TRL 1.16.
  ``hinge``: ``relu(1 - beta * delta)``.
  ``ipo``: ``(delta_avg - 1 / (2 * beta)) ** 2`` where ``delta_avg`` uses each log-ratio divided by its own
  number of completion tokens (``completion_mask.sum(1).clamp(min=1)``).
  ``robust``: ``(-(1 - eps) * logsigmoid(beta * delta) + eps * logsigmoid(-beta * delta)) / (1 - 2 * eps)``.
  Conservative DPO (cDPO, ``-(1 - eps) * logsigmoid(beta * delta) - eps * logsigmoid(-beta * delta)``, what
  ``label_smoothing`` meant for ``sigmoid`` before TRL 1.0) is no single TRL 1.16 loss type;
  :func:`trl_dpo_reference` asked for ``loss_type="sigmoid"`` with ``label_smoothing > 0`` builds it exactly
  from TRL's own terms: ``loss_type=["sigmoid", "robust"]`` with ``loss_weights=[2(1 - eps), -(1 - 2 eps)]``.
Metrics (logged under these names, one value per batch; every mean is over the pairs of the batch):
  ``rewards/chosen`` = mean ``beta * (chosen_logps - ref_chosen_logps)``, ``rewards/rejected`` likewise,
  ``rewards/margins`` = mean of their difference, ``rewards/accuracies`` = mean of ``chosen > rejected``
  (strict), ``logps/chosen`` / ``logps/rejected`` = mean policy sum-log-probabilities, ``logits/chosen`` /
  ``logits/rejected`` = the mean over scored tokens of each token's mean logit over the vocabulary,
  ``entropy`` = mean per-token entropy over all scored tokens (chosen and rejected), ``mean_token_accuracy`` =
  the fraction of scored chosen tokens that are the argmax (first maximum), ``num_tokens`` = running sum of
  ``attention_mask`` (every real token, prompt and completion, of both halves; padding excluded).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import warnings

import torch

TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "num_tokens")


def _trl_losses(loss_type: str, label_smoothing: float) -> tuple[list[str], list[float] | None]:
    """TRL's ``loss_type`` list and ``loss_weights`` for one loss (cDPO for ``sigmoid`` with smoothing)."""
    if loss_type == "sigmoid" and label_smoothing > 0:
        eps = label_smoothing
        if not eps < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5) for conservative DPO, got {eps}")
        # 2(1-e) * sigmoid + (-(1-2e)) * robust = -(1-e) logsigmoid(bd) - e logsigmoid(-bd), the cDPO loss
        return ["sigmoid", "robust"], [2 * (1 - eps), -(1 - 2 * eps)]
    return [loss_type], None


def trl_dpo_reference(model, ref_model, tokenizer, records: list[dict], loss_type: str = "sigmoid",
                      beta: float = 0.1, label_smoothing: float = 0.0, peft_config=None,
                      adapter_weights: dict[str, torch.Tensor] | None = None, max_length: int | None = 1024) -> dict:
    """One training step's loss, metrics and gradients from TRL's ``DPOTrainer`` on ``records`` as one batch.

    ``model`` and ``ref_model`` are copied (TRL patches their ``forward`` and wraps ``model`` with peft), so the
    caller's modules stay untouched. With ``peft_config`` (and ``ref_model=None``) TRL adds the adapter itself and
    its reference is the model with the adapter disabled; ``adapter_weights`` (names as in the peft model's
    ``named_parameters()``, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight``)
    then replace TRL's freshly initialized adapter weights, so both sides start from the same adapter.

    Returns ``{"loss": float, "metrics": {TRL name: float}, "grads": {name: tensor}, "batch": {key: tensor}}``:
    the gradients of every trainable parameter of the policy (names as in its ``named_parameters()``: the peft
    model's names with ``peft_config``), and the collated batch TRL trained on (``input_ids``,
    ``attention_mask``, ``completion_mask``; chosen rows then rejected rows).
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if not records:
        raise ValueError("trl_dpo_reference needs at least one record")
    if (ref_model is None) == (peft_config is None):
        raise ValueError("give either ref_model (full fine-tuning) or peft_config (adapter-disabled reference)")
    loss_types, loss_weights = _trl_losses(loss_type, label_smoothing)
    policy = copy.deepcopy(model)
    reference = copy.deepcopy(ref_model) if ref_model is not None else None
    with tempfile.TemporaryDirectory(prefix="trl-dpo-ref-") as out, _quiet():
        args = DPOConfig(
            output_dir=out, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
            per_device_train_batch_size=len(records), gradient_accumulation_steps=1, bf16=False, fp16=False,
            use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, dataloader_num_workers=0,
            beta=beta, loss_type=loss_types, loss_weights=loss_weights, label_smoothing=label_smoothing,
            max_length=max_length, seed=0,
        )
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(records),
                             processing_class=copy.deepcopy(tokenizer), peft_config=peft_config)
        if len(trainer.train_dataset) != len(records):
            raise ValueError(f"TRL dropped {len(records) - len(trainer.train_dataset)} record(s) whose prompt fills "
                             f"max_length={max_length}")
        if adapter_weights is not None:
            if peft_config is None:
                raise ValueError("adapter_weights only apply with a peft_config")
            _load_named(trainer.model, adapter_weights)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])  # dataset order
        trainer.model.zero_grad(set_to_none=True)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by training_step
        loss = trainer.training_step(trainer.model, batch)  # train mode, compute_loss, backward: as TRL trains
    metrics = {key: float(values[-1]) for key, values in trainer._metrics["train"].items()}
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters()
             if p.requires_grad and p.grad is not None}
    missing = [name for name, p in trainer.model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(f"TRL's step left trainable parameters without a gradient: {missing[:5]}")
    return {"loss": float(loss), "metrics": metrics, "grads": grads, "batch": {k: v.detach().cpu() for k, v in
                                                                               batch.items()}}


def _load_named(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise KeyError(f"adapter_weights names not in TRL's peft model: {unknown[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


@contextlib.contextmanager
def _quiet():
    """datasets' progress bars and TRL's deprecation warnings off; TRL's logged warnings (a prompt that is not a
    token prefix of prompt+completion, say) still print."""
    import datasets

    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()
