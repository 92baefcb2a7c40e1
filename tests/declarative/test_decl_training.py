"""Training a declarative LLM further after ``load``, the trainer's regularization in the loss that trains, and
few-shot examples retrieved by similarity."""

import pytest
import torch
import torch.nn.functional as F
import yaml
from decl_helpers import date_rows, make_config
from safetensors.torch import load_file

from hfbridge import cli
from hfbridge.declarative import LLM, load_llm
from hfbridge.declarative.dataset import write_rows
from hfbridge.declarative.training import datamodule_for, module_for, run_config
from hfbridge.models.peft_adapters import is_peft_model
from hfbridge.reporting import read_metrics

LORA = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}  # no dropout: a training loss is a plain forward


def _trainer(cfg: dict, **settings) -> dict:
    cfg["trainer"].update({"batch_size": 8, "epochs": 5, "learning_rate": 1e-2, "evaluate_before": False,
                           "learning_rate_scheduler": {"decay": "constant", "warmup_fraction": 0.0}, **settings})
    return cfg


def _eval_loss(llm: LLM, records: list[dict]) -> float:
    inputs, targets = llm.encode_inputs(records), llm.encode_targets(records)
    with torch.no_grad():
        return float(llm.eval_loss(targets, llm.forward((inputs, targets)))[0])


def _train_losses(llm: LLM, records: list[dict], out) -> list[float]:
    llm.train(records, output_dir=out, progress_bar=False)
    return [v for _, v in read_metrics(out / "metrics.csv")["train_loss"]]


# ------------------------------------------------------------------------------------ 1. train on after load
def test_training_continues_from_a_loaded_adapter_or_merged_save(tiny_model_dir, tmp_path):
    """One batch of all 8 records per step, so the continued run's first step sees exactly the records the saved
    model was last evaluated on: its training loss is that evaluation loss."""
    records = date_rows(8)
    llm = LLM(_trainer(make_config(tiny_model_dir, "text", adapter=LORA), train_steps=2), random_seed=0,
              device="cpu")
    _train_losses(llm, records, tmp_path / "first")
    saved = _eval_loss(llm, records)
    llm.save(tmp_path / "adapter")
    llm.save(tmp_path / "merged", merged=True)

    # The adapter comes back trainable on the frozen base, and training goes on from it.
    again = load_llm(tmp_path / "adapter")
    trainable = {n for n, p in again.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert _eval_loss(again, records) == pytest.approx(saved, abs=1e-6)
    losses = _train_losses(again, records, tmp_path / "continued")
    assert losses[0] == pytest.approx(saved, abs=1e-5) and losses[-1] < losses[0]
    assert _eval_loss(again, records) < saved

    # A merged save trains on through a fresh adapter of the config's adapter section, the merged weights frozen.
    merged = load_llm(tmp_path / "merged")
    assert not is_peft_model(merged.model)
    losses = _train_losses(merged, records, tmp_path / "continued-merged")
    assert losses[0] == pytest.approx(saved, abs=1e-5) and losses[-1] < losses[0]
    assert is_peft_model(merged.model)
    weights = load_file(tmp_path / "merged" / "model_weights" / "model.safetensors")
    base = merged.model.get_base_model().state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(base[name.replace("q_proj.weight", "q_proj.base_layer.weight")], weights[name])
    # Its adapter alone belongs to the merged weights: loading it puts it back on them.
    trained = _eval_loss(merged, records)
    merged.save(tmp_path / "merged-adapter")
    assert _eval_loss(load_llm(tmp_path / "merged-adapter"), records) == pytest.approx(trained, abs=1e-5)


def test_a_full_save_trains_on_in_full(tiny_model_dir, tmp_path):
    records = date_rows(8)
    llm = LLM(_trainer(make_config(tiny_model_dir, "text"), train_steps=1, learning_rate=1e-3), random_seed=0,
              device="cpu")
    _train_losses(llm, records, tmp_path / "first")
    saved = _eval_loss(llm, records)
    llm.save(tmp_path / "full")
    again = load_llm(tmp_path / "full")
    losses = _train_losses(again, records, tmp_path / "continued")
    assert losses[0] == pytest.approx(saved, abs=1e-5) and not is_peft_model(again.model)
    assert _eval_loss(again, records) < saved


# ------------------------------------------------------------------------------------ 3. regularization
def _norm(model, kind: str) -> torch.Tensor:
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    l1, l2 = sum(p.abs().sum() for p in params), sum((p * p).sum() for p in params)
    return {"l1": l1, "l2": l2, "l1_l2": l1 + l2}[kind]


@pytest.mark.parametrize("kind", ["l1", "l2", "l1_l2"])
def test_the_module_that_trains_adds_the_regularization_penalty(tiny_model_dir, kind):
    """The module the pipeline trains (``module_for``) on a fixed batch: cross-entropy per target token, by hand,
    plus lambda times the norm of the trainable weights; ``LLM.train_loss`` gives the same."""
    cfg = make_config(tiny_model_dir, "text", adapter=LORA)
    cfg["trainer"].update(regularization_type=kind, regularization_lambda=0.05)
    llm = LLM(cfg, random_seed=0, device="cpu")
    records = date_rows(4)
    recipe = run_config(llm.config_obj)
    module = module_for(llm, recipe)
    module.configure_model()
    module.model.eval()
    data = datamodule_for(llm, records, None, recipe)
    data.setup()
    batch = data.collator(data.train_samples)
    with torch.no_grad():
        loss = module.training_step(batch)
        logits = llm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        valid = batch["labels"] != -100
        cross_entropy = F.cross_entropy(logits[valid].float(), batch["labels"][valid])
        expected = cross_entropy + 0.05 * _norm(llm.model, kind)
        inputs, targets = llm.encode_inputs(records), llm.encode_targets(records)
        seed_api, _ = llm.train_loss(targets, llm.forward((inputs, targets)), kind, 0.05)
    assert 0.05 * _norm(llm.model, kind) > 1e-3 * cross_entropy  # the penalty is not lost in the rounding
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(seed_api) == pytest.approx(float(expected), rel=1e-5)


def test_hfbridge_train_trains_with_the_configured_penalty(tiny_model_dir, tmp_path):
    """Through the one pipeline: the first step's logged penalty is lambda * sum w^2 of the freshly initialised
    adapter (the same seed builds the same one here), and a strong penalty shrinks the adapter."""
    cfg = _trainer(make_config(tiny_model_dir, "text", adapter=LORA), train_steps=2,
                   regularization_type="l2", regularization_lambda=0.5)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    data = write_rows(date_rows(8, "train") + date_rows(2, "test"), tmp_path / "d.csv")
    assert cli.main(["train", "--config", str(config), "--data", str(data), "--output", str(tmp_path / "run"),
                     "--no-progress-bar", "--seed", "0"]) == 0
    penalty = read_metrics(tmp_path / "run" / "metrics.csv")["train_regularization"]
    fresh = LLM(cfg, random_seed=0, device="cpu")
    assert penalty[0][1] == pytest.approx(0.5 * float(_norm(fresh.model, "l2")), rel=1e-5)
    assert penalty[1][1] < penalty[0][1]


# ------------------------------------------------------------------------------------ 4. few-shot retrieval
@pytest.mark.parametrize("retrieval", ["similarity", "random"])
def test_few_shot_similarity_retrieval_shows_the_nearest_training_record(retrieval, tiny_model_dir, tmp_path):
    """The test record 'March 3, 2021' is also in the training split: similarity retrieval shows it (and its
    answer) in the prompt, also after loading the saved model; random retrieval (seed 0) draws 'March 7'."""
    cfg = make_config(tiny_model_dir, "text")
    cfg["trainer"] = {"type": "none", "eval_batch_size": 4}
    cfg["prompt"].update(few_shot=1, few_shot_retrieval=retrieval)
    query = {"date": "March 3, 2021", "iso": "2021-03-03"}
    data = write_rows(date_rows(8, "train") + [{**query, "split": "test"}], tmp_path / "d.csv")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", "--config", str(config), "--data", str(data), "--output", str(tmp_path / "run"),
                     "--no-progress-bar", "--seed", "0"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "model" / "llm_config.yaml").read_text())
    assert len(saved["prompt"]["examples"]) == (8 if retrieval == "similarity" else 1)
    llm = load_llm(tmp_path / "run")
    prompt = llm.tokenizer.decode(llm.encode_inputs([query])["date"][0], skip_special_tokens=True)
    if retrieval == "similarity":
        assert llm.few_shot_examples([query]) == [[query]]
        assert "Convert March 3, 2021\nAnswer: 2021-03-03" in prompt
    else:
        assert llm.few_shot_examples([query]) == [None] and saved["prompt"]["examples"][0]["date"] == "March 7, 2021"
        assert "2021-03-03" not in prompt and "2021-03-07" in prompt
    assert prompt.count("Convert ") == 2  # one example, then the record


def test_training_samples_never_show_their_own_answer(tiny_model_dir):
    cfg = make_config(tiny_model_dir, "text", prompt={"template": "Convert {date}", "few_shot": 2,
                                                      "few_shot_retrieval": "similarity",
                                                      "examples": date_rows(6)})
    llm = LLM(cfg, random_seed=0, device="cpu")
    records = date_rows(6)
    assert [e[0] for e in llm.few_shot_examples(records)] == records  # each record's nearest is itself
    for record, examples in zip(records, llm.few_shot_examples(records, exclude_self=True)):
        assert len(examples) == 2 and record not in examples
    for record, sample in zip(records, llm.training_samples(records)):
        user = sample["messages"][-2]["content"] if "messages" in sample else sample["prompt"]
        assert user.count(record["iso"]) == 0 and user.count("Convert ") == 3
    # Replacing the model forgets the pool's embeddings, which were the old model's.
    assert llm._pool_vectors is not None
    llm.model = llm.model
    assert llm._pool_vectors is None


def test_similarity_retrieval_needs_k():
    from hfbridge.declarative.schema import ConfigError, parse_config

    cfg = make_config("m", "text", prompt={"template": "Convert {date}", "few_shot_retrieval": "similarity"})
    with pytest.raises(ConfigError, match="prompt.few_shot_retrieval: similarity needs prompt.few_shot >= 1"):
        parse_config(cfg)
