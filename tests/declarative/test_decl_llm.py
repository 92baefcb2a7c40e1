"""The LLM class: merged ids, losses equal to the core's, batched generation, label scoring, devices."""

import logging

import pytest
import torch
from decl_helpers import LABELS, date_rows, make_config, review_rows

from hfbridge.data.datamodule import CausalLMDataModule
from hfbridge.declarative import LLM, realign_target_and_prediction_tensors
from hfbridge.declarative.devices import GIB, QuantizationError, plan_max_memory
from hfbridge.models.causal_lm import HFAutoModelForCausalLM


def _llm(model_dir, output="text", **sections):
    return LLM(make_config(model_dir, output, **sections), random_seed=0, device="cpu")


@pytest.fixture(scope="module")
def text_llm(tiny_model_dir):
    return _llm(tiny_model_dir, "text", adapter={"type": "lora", "r": 4, "alpha": 8})


@pytest.fixture(scope="module")
def category_llm(tiny_model_dir):
    return _llm(tiny_model_dir, "category", prompt={"template": "Review: {review}\nSentiment:", "chat": False})


@pytest.mark.parametrize("kind", ["text-chat", "category-plain"])
def test_train_loss_equals_the_core_training_loss(kind, text_llm, category_llm):
    llm, records = (text_llm, date_rows(5)) if kind == "text-chat" else (category_llm, review_rows(5))
    inputs, targets = llm.encode_inputs(records), llm.encode_targets(records)
    llm.model.eval()
    with torch.no_grad():
        loss, per_feature = llm.train_loss(targets, llm.forward((inputs, targets)))
        eval_loss, additional = llm.eval_loss(targets, llm.outputs_to_predictions(llm.forward((inputs, targets))))
    # The same records through the core: samples in a core format, the DataModule's collator, training_step.
    data = CausalLMDataModule(llm.tokenizer, [llm.renderer.sample(r) for r in records],
                              data_format=llm.renderer.fmt, batch_size=8)
    data.setup()
    module = HFAutoModelForCausalLM(model_name=llm.model, tokenizer=llm.tokenizer)
    module.configure_model()
    module.model.eval()
    with torch.no_grad():
        core = module.training_step(data.collator(data.train_samples))
    assert torch.allclose(loss, core, atol=1e-5) and torch.allclose(eval_loss, core, atol=1e-5)
    assert float(additional) == 0.0 and set(per_feature) == {llm.config_obj.output_feature.name}


def test_merged_ids_are_left_padded_with_the_stop_tokens_and_masked_by_length(text_llm):
    llm = text_llm
    pad = llm.pad_id
    records = date_rows(3)
    inputs, targets = llm.encode_inputs(records), llm.encode_targets(records)
    ids, mask = llm._generate_merged_ids(inputs["date"], targets["iso"])
    for row, record in enumerate(records):
        prompt, target = llm.encoder.split(record)
        expected = prompt + target + llm.encoder.stop_ids
        n = len(expected)
        assert ids[row, -n:].tolist() == expected and mask[row, -n:].eq(1).all()
        assert ids[row, :-n].eq(pad).all() and mask[row, :-n].eq(0).all()
    assert llm._add_left_padding(torch.tensor([5, 6]), 4, pad_value=-1).tolist() == [-1, -1, 5, 6]
    # A pad id inside a sequence (chat models often pad with their end-of-turn token) is not masked.
    assert llm._create_attention_mask(torch.tensor([[pad, pad, 30, pad, 40]])).tolist() == [[0, 0, 1, 1, 1]]
    assert llm._generate_merged_ids(inputs["date"], None)[0] is inputs["date"]


def test_batched_generation_equals_one_sample_at_a_time(text_llm):
    records = date_rows(6) + [{"date": "the 3rd of March, 2021 " * 4, "iso": "x"}]
    batched = text_llm.generate(text_llm.encode_inputs(records), batch_size=4)
    single = [text_llm.generate(text_llm.encode_inputs([r]), batch_size=1) for r in records]
    assert batched["iso::generated_ids"] == [s["iso::generated_ids"][0] for s in single]
    assert batched["iso::predictions"] == [s["iso::predictions"][0] for s in single]


def test_inputs_longer_than_max_input_length_are_cut_with_a_warning(text_llm, caplog):
    llm = text_llm
    assert llm.max_input_length == llm.context_len - llm.max_new_tokens - 8 == 256 - 5 - 8
    long = {"date": "March 1, 2021 " * 80, "iso": "x"}
    with caplog.at_level(logging.WARNING):
        out = llm.generate(llm.encode_inputs([long]))
    assert "longer than max_input_length=243" in caplog.text
    assert len(out["iso::generated_ids"][0]) <= llm.max_new_tokens


def test_category_labels_are_scored_so_every_class_gets_a_probability(category_llm):
    llm = category_llm
    records = review_rows(4)
    out = llm.generate(llm.encode_inputs(records))
    probabilities = out["sentiment::probabilities"]
    assert probabilities.shape == (4, 3) and torch.allclose(probabilities.sum(-1), torch.ones(4))
    assert out["sentiment::predictions"] == [LABELS[i] for i in probabilities.argmax(-1).tolist()]
    # A label's log-likelihood is minus the summed teacher-forced loss of its tokens (and stop tokens).
    for row, record in enumerate(records):
        for k, label in enumerate(LABELS):
            one = {**record, "sentiment": label}
            inputs, targets = llm.encode_inputs([one]), llm.encode_targets([one])
            with torch.no_grad():
                loss, _ = llm.train_loss(targets, llm.forward((inputs, targets)))
            n = len(llm.encoder.target_ids(one)) + len(llm.encoder.stop_ids)
            assert float(out["sentiment::logits"][row, k]) == pytest.approx(-float(loss) * n, abs=1e-3)
        break  # one record covers it; the others only add time
    # The prompt's KV cache shared by the labels gives the scores of scoring every prompt + label in full.
    assert llm._cache_argument() is not None  # the cached path is the one score_labels takes, on every release
    prompts, tails = [llm.encoder.prompt_ids(r) for r in records], llm._label_tail_ids()
    with torch.no_grad():
        cached, full = llm._score_part_cached(prompts, tails), llm._score_part_full(prompts, tails)
    assert torch.allclose(cached, full, atol=1e-4)


def test_metrics_predictions_and_args(text_llm, category_llm):
    result = text_llm.evaluate(date_rows(4))
    metrics = result.metrics["iso"]
    for key in ("loss", "perplexity", "token_accuracy", "exact_match", "bleu", "rouge1", "rougeL"):
        assert key in metrics
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-5)
    assert len(result.predictions) == 4 and "iso_predictions" in result.predictions[0]
    metrics = category_llm.evaluate(review_rows(6)).metrics["sentiment"]
    assert metrics["samples"] == 6 and len(metrics["confusion_matrix"]) == 3
    assert sum(map(sum, metrics["confusion_matrix"])) == 6 and 0 <= metrics["macro_f1"] <= 1
    rows = category_llm.predict(review_rows(2))
    assert set(rows[0]) == {"sentiment_predictions", "sentiment_probability",
                            *(f"sentiment_probabilities_{label}" for label in LABELS)}
    inputs, outputs, seed = text_llm.get_args()
    assert inputs == [{"name": "date", "type": "text", "labels": None}] and outputs[0]["name"] == "iso"
    assert seed == 0 and LLM.type() == "llm"
    grouped = text_llm.outputs_to_predictions({"iso::predictions": ["a"], "iso::logits": 1, "other": 2})
    assert grouped == {"iso": {"predictions": ["a"], "logits": 1}}


def test_realign_pads_the_shorter_tensor_and_casts_to_float32(tiny_tokenizer):
    targets = {"out": torch.tensor([[1, 2, 3, 4]])}
    predictions = {"out": {"predictions": torch.tensor([[7, 8]]), "probabilities": torch.ones(1, 2, 5)}}
    t, p = realign_target_and_prediction_tensors(targets, predictions, "out", tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    assert p["out"]["predictions"].tolist() == [[7, 8, pad, pad]] and p["out"]["predictions"].dtype == torch.float32
    assert p["out"]["probabilities"].shape == (1, 4, 5) and t["out"].dtype == torch.float32
    assert predictions["out"]["predictions"].shape == (1, 2)  # inputs unchanged
    t, p = realign_target_and_prediction_tensors({"out": torch.tensor([[1]])}, predictions, "out", tiny_tokenizer,
                                                 pad_direction="left", pad_value=0)
    assert t["out"].tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="pad_direction"):
        realign_target_and_prediction_tensors(targets, predictions, "out", tiny_tokenizer, pad_direction="up")


def test_to_device_on_the_cpu_is_a_logged_no_op(text_llm, caplog):
    with caplog.at_level(logging.INFO, logger="hfbridge.declarative.llm"):
        assert text_llm.to_device("cpu") is text_llm
    assert "already there; nothing to do" in caplog.text
    with pytest.raises(ValueError, match="no CUDA GPU" if not torch.cuda.is_available() else "only"):
        text_llm.to_device("cuda:99" if torch.cuda.is_available() else "cuda")


def test_the_gpu_memory_plan_follows_free_memory_not_a_fixed_size():
    free = [40 * GIB, 10 * GIB, GIB // 4]
    plan = plan_max_memory(free, margin=0.1, reserve_bytes=GIB // 2)
    assert plan == {0: int(36 * GIB) - GIB // 2, 1: int(9 * GIB) - GIB // 2}  # GPU 2 is too full to use
    assert plan_max_memory({3: 8 * GIB}, margin=0.0, reserve_bytes=0, cpu_bytes=GIB) == {3: 8 * GIB, "cpu": GIB}
    with pytest.raises(RuntimeError, match="no GPU has enough free memory"):
        plan_max_memory([GIB // 4])


def test_quantization_the_device_cannot_do_is_refused_before_loading(tiny_model_dir, monkeypatch):
    cfg = make_config(tiny_model_dir, "text", quantization={"bits": 4}, adapter={"type": "lora"})
    with pytest.raises(QuantizationError, match="bitsandbytes quantizes on CUDA GPUs and on the CPU, not on 'mps'"):
        LLM(cfg, device="mps")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(QuantizationError, match="needs the bitsandbytes package"):
        LLM(cfg, device="cpu")


def test_a_4bit_model_with_an_adapter_runs_on_the_cpu(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    llm = _llm(tiny_model_dir, "text", quantization={"bits": 4}, adapter={"type": "lora", "r": 4})
    from hfbridge.models.peft_adapters import is_quantized

    assert is_quantized(llm.model)
    records = date_rows(2)
    loss, _ = llm.train_loss(llm.encode_targets(records), llm.forward((llm.encode_inputs(records),
                                                                       llm.encode_targets(records))))
    assert torch.isfinite(loss)
