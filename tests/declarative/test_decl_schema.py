"""The config is checked key by key, before anything loads; errors name the key's path and what is allowed."""

from pathlib import Path

import pytest
import yaml
from decl_helpers import make_config

from hfbridge.declarative.schema import ConfigError, LLMConfig, dump_config, load_config, parse_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(cfg)
    return str(info.value)


def test_a_full_config_validates_with_defaults(text_config):
    text_config["adapter"] = {"type": "dora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    text_config["quantization"] = {"bits": 4}
    text_config["trainer"]["learning_rate"] = "2e-4"  # YAML 1.1 reads 2e-4 as a string
    cfg = parse_config(text_config)
    assert isinstance(cfg, LLMConfig)
    assert cfg.trainer.learning_rate == 2e-4 and cfg.adapter.type == "dora" and cfg.quantization.bits == 4
    assert cfg.preprocessing.split.type == "auto" and cfg.model_parameters.dtype == "auto"
    assert cfg.max_new_tokens == 5 and cfg.model_name == cfg.base_model


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["trainer"].update(batchsize=8), "trainer.batchsize: unknown key (did you mean 'batch_size'?)"),
        (lambda c: c.update(adaptor={"type": "lora"}), "adaptor: unknown key (did you mean 'adapter'?)"),
        (lambda c: c["trainer"].update(batch_size=0), "trainer.batch_size: must be >= 1, got 0"),
        (lambda c: c["trainer"].update(type="sft"), "trainer.type: must be one of none, finetune, got 'sft'"),
        (lambda c: c.update(adapter={"type": "lorax"}), "adapter.type: must be one of lora, dora, ia3, loha, lokr"),
        (lambda c: c.update(adapter={"dropout": 1.5}), "adapter.dropout: must be in [0.0, 1.0), got 1.5"),
        (lambda c: c.update(quantization={"bits": 3}), "quantization.bits: must be one of 4, 8, got 3"),
        (lambda c: c.update(generation={"max_new_token": 5}), "generation.max_new_token: not a transformers "
         "GenerationConfig field (did you mean 'max_new_tokens'"),
        (lambda c: c.update(model_type="ecd"), "model_type: must be one of llm, got 'ecd'"),
        (lambda c: c.pop("base_model"), "base_model: required key is missing"),
        (lambda c: c["input_features"][0].update(type="image"), "input_features[0].type: must be one of text"),
        (lambda c: c["output_features"][0].update(type="number"),
         "output_features[0].type: must be one of text, category"),
        (lambda c: c["output_features"][0].update(labels=["a", "b"]),
         "output_features[0].labels: only category outputs have labels"),
        (lambda c: c.update(preprocessing={"split": {"probabilities": [0.5, 0.2]}}),
         "preprocessing.split.probabilities: must be 3 non-negative numbers"),
        (lambda c: c["trainer"].update(learning_rate="fast"), "trainer.learning_rate: must be a number"),
    ],
)
def test_a_bad_key_or_value_names_its_path_and_what_is_allowed(text_config, edit, message):
    edit(text_config)
    assert message in _error(text_config)


def test_a_template_placeholder_with_no_column_is_an_error(text_config):
    text_config["prompt"]["template"] = "Convert {date} from {country}"
    message = _error(text_config)
    assert "prompt.template: placeholder {country} names no input feature; input features: date" in message


def test_every_problem_is_reported_at_once(text_config):
    text_config["trainer"]["epochs"] = 0
    text_config["adapter"] = {"r": 0}
    text_config["prompt"]["template"] = "{nothing}"
    message = _error(text_config)
    for part in ("trainer.epochs", "adapter.r", "{nothing}"):
        assert part in message


def test_a_category_output_needs_its_labels(category_config):
    category_config["output_features"][0].pop("labels")
    assert "output_features[0].labels: a category output needs a list of at least 2 labels" in _error(category_config)
    category_config["output_features"][0]["labels"] = ["a", "a"]
    assert "labels must be unique" in _error(category_config)


def test_peft_options_are_checked_when_the_config_is(text_config):
    text_config["adapter"] = {"type": "lora", "options": {"no_such_option": 1}}
    assert "adapter.options: peft rejects the adapter settings" in _error(text_config)


def test_quantized_finetuning_needs_an_adapter(text_config):
    text_config["quantization"] = {"bits": 4}
    assert "quantization: fine-tuning quantized weights needs an adapter" in _error(text_config)


def test_yaml_files_round_trip_and_report_their_name(tmp_path, text_config):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(text_config))
    cfg = load_config(path)
    dump_config(cfg, tmp_path / "full.yaml")
    assert load_config(tmp_path / "full.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("model_type: llm\nbase_model: [\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["llm_text_dates.yaml", "llm_category_tickets.yaml",
                                  "llm_category_tickets_few_shot.yaml"])
def test_the_example_configs_validate(name):
    cfg = load_config(EXAMPLES / name)
    assert cfg.base_model == "smollm2-135m-instruct"


def test_labels_read_as_numbers_become_strings(tiny_model_dir):
    cfg = make_config(tiny_model_dir, "category")
    cfg["output_features"][0]["labels"] = [0, 1]
    cfg["prompt"]["template"] = "Review: {review}"
    assert parse_config(cfg).output_feature.labels == ["0", "1"]
