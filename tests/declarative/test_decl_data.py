"""Data sets are read (CSV, JSONL, Parquet), checked against the config with file and line, and split."""

import pytest
from decl_helpers import date_rows, make_config, review_rows

from hfbridge.data.demo_category import LABELS, ticket_records
from hfbridge.declarative.dataset import DatasetError, read_dataset, split_rows, write_rows
from hfbridge.declarative.examples import write_example_data
from hfbridge.declarative.prompt import PromptRenderer
from hfbridge.declarative.schema import parse_config


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_every_file_type_reads_the_same_rows(tmp_path, text_config, suffix):
    cfg = parse_config(text_config)
    path = write_rows(date_rows(4, "train") + date_rows(2, "test"), tmp_path / f"d{suffix}")
    rows = read_dataset(path, cfg)
    assert [r for _, r in rows][:4] == date_rows(4, "train")
    splits = split_rows(rows, cfg, seed=0)
    assert len(splits.train) == 4 and len(splits.test) == 2 and not splits.validation


def test_a_column_named_in_the_config_but_absent_is_reported_with_file_and_line(tmp_path, text_config):
    cfg = parse_config(text_config)
    path = write_rows([{"when": "March 1, 2021", "iso": "2021-03-01"}], tmp_path / "d.csv")
    with pytest.raises(DatasetError, match=r"d.csv:2: column 'date' is named in input_features but absent "
                                           r"from the data \(columns: when, iso\)"):
        read_dataset(path, cfg)
    path = write_rows([{"date": "March 1, 2021"}], tmp_path / "d.jsonl")
    with pytest.raises(DatasetError, match="d.jsonl:1: column 'iso' is named in output_features"):
        read_dataset(path, cfg)
    assert read_dataset(path, cfg, need_target=False)  # predicting needs no target column


def test_a_category_value_not_in_the_labels_is_reported(tmp_path, category_config):
    cfg = parse_config(category_config)
    rows = review_rows(3) + [{"review": "meh", "sentiment": "mixed"}]
    path = write_rows(rows, tmp_path / "r.jsonl")
    with pytest.raises(DatasetError, match=r"r.jsonl:4: sentiment='mixed' is not one of the category labels "
                                           r"\[positive, negative, neutral\]"):
        read_dataset(path, cfg)


def test_numeric_category_values_match_string_labels(tmp_path, tiny_model_dir):
    raw = make_config(tiny_model_dir, "category")
    raw["output_features"][0]["labels"] = [0, 1]
    raw["prompt"]["template"] = "{review}"
    cfg = parse_config(raw)
    path = write_rows([{"review": "a", "sentiment": 1}, {"review": "b", "sentiment": 0}], tmp_path / "n.jsonl")
    assert [r["sentiment"] for _, r in read_dataset(path, cfg)] == ["1", "0"]


def test_random_and_fixed_splits(tmp_path, text_config):
    text_config["preprocessing"] = {"split": {"type": "random", "probabilities": [0.5, 0.25, 0.25]}}
    cfg = parse_config(text_config)
    rows = [(f"r{i}", r) for i, r in enumerate(date_rows(8))]
    a, b = split_rows(rows, cfg, seed=1), split_rows(rows, cfg, seed=1)
    assert a == b and (len(a.train), len(a.validation), len(a.test)) == (4, 2, 2)
    text_config["preprocessing"] = {"split": {"type": "fixed", "column": "part"}}
    cfg = parse_config(text_config)
    with pytest.raises(DatasetError, match="r0: no split column 'part'"):
        split_rows(rows, cfg, seed=0)
    bad = [("f.csv:2", {**date_rows(1)[0], "part": "dev-ish"})]
    with pytest.raises(DatasetError, match="f.csv:2: part='dev-ish' is not a split"):
        split_rows(bad, cfg, seed=0)


def test_the_generated_ticket_set_is_balanced_and_disjoint():
    train, test = ticket_records(80, 0, "train"), ticket_records(40, 0, "test")
    assert ticket_records(80, 0, "train") == train  # deterministic
    assert {r["department"] for r in train} == set(LABELS)
    assert sum(r["department"] == "billing" for r in train) == 20
    assert not {r["ticket"] for r in train} & {r["ticket"] for r in test}


def test_example_data_files(tmp_path):
    path = write_example_data("dates", tmp_path / "dates.csv", 6, 3)
    lines = path.read_text().splitlines()
    assert lines[0] == "date,iso,split" and len(lines) == 10
    with pytest.raises(ValueError, match="unknown example task"):
        write_example_data("poems", tmp_path / "p.csv", 1, 1)


def test_prompts_render_templates_tasks_labels_and_few_shot_examples(tiny_model_dir, tiny_tokenizer):
    raw = make_config(tiny_model_dir, "category")
    raw["prompt"] = {"task": "Classify the review.", "system": "Be brief.",
                     "examples": [{"review": "great", "sentiment": "positive"}]}
    cfg = parse_config(raw)
    chat = PromptRenderer.for_tokenizer(cfg, tiny_tokenizer)
    assert chat.chat and chat.fmt == "messages"
    messages = chat.prompt({"review": "dull"})
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == (
        "Classify the review.\nreview: great\nAnswer with one of: positive, negative, neutral.\nAnswer: positive\n\n"
        "Classify the review.\nreview: dull\nAnswer with one of: positive, negative, neutral."
    )
    assert chat.sample({"review": "dull", "sentiment": "negative"})["messages"][-1] == {
        "role": "assistant", "content": "negative"}
    raw["prompt"] = {"template": "Review: {review}\nSentiment:", "chat": False}
    plain = PromptRenderer.for_tokenizer(parse_config(raw), tiny_tokenizer)
    assert plain.sample({"review": "dull", "sentiment": "negative"}) == {
        "prompt": "Review: dull\nSentiment:", "completion": " negative"}
