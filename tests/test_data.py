import json
import logging

import pytest
import torch

from hfbridge.data import (
    CausalLMDataModule,
    DataFormatError,
    DataSourceError,
    EpochShuffleSampler,
    PaddedCollator,
    load_records,
    read_records,
    shift_for_causal_lm,
    tokenize_record,
)
from hfbridge.data.collators import StepTokenCounter
from hfbridge.data.demo import date_records, write_demo_data
from hfbridge.losses import IGNORE_INDEX


def test_shift_trains_the_first_target_token_from_the_last_prompt_token():
    ids = [10, 11, 12, 20, 21, 2]  # prompt 10 11 12, completion 20 21, eos 2
    trained = [False, False, False, True, True, True]
    input_ids, labels = shift_for_causal_lm(ids, trained)
    assert input_ids == [10, 11, 12, 20, 21]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, 20, 21, 2]


def test_prompt_completion_trains_completion_and_eos_only(tiny_tokenizer, prompt_data):
    record = prompt_data[0]
    sample = tokenize_record(tiny_tokenizer, record, "prompt_completion")
    prompt_ids = tiny_tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    completion_ids = tiny_tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
    trained = [t for t in sample.labels if t != IGNORE_INDEX]
    assert trained == completion_ids + [tiny_tokenizer.eos_token_id]
    # the first completion token is the label of the last prompt position
    assert sample.labels[len(prompt_ids) - 1] == completion_ids[0]
    assert all(t == IGNORE_INDEX for t in sample.labels[: len(prompt_ids) - 1])


def test_messages_train_assistant_turns_with_their_end_of_turn_token(tiny_tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say one"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "Say two"},
        {"role": "assistant", "content": "two"},
    ]}
    sample = tokenize_record(tiny_tokenizer, record, "messages")
    trained_text = tiny_tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])
    assert trained_text == "one<|im_end|>\ntwo<|im_end|>\n"
    untrained = tiny_tokenizer.decode([i for i, t in zip(sample.input_ids, sample.labels) if t == IGNORE_INDEX])
    assert "Say one" in untrained and "Be brief" in untrained


def test_messages_without_chat_template_is_a_clear_error(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataFormatError, match="no chat template"):
        tokenize_record(tok, record, "messages")


def test_padding_is_never_trained(tiny_tokenizer, prompt_data):
    samples = [tokenize_record(tiny_tokenizer, r, "prompt_completion") for r in prompt_data[:3]]
    samples[0].input_ids += [5] * 7
    samples[0].labels += [7] * 7  # make one sample longer so the others are padded
    batch = PaddedCollator(tiny_tokenizer.pad_token_id)(samples)
    padded = batch["attention_mask"] == 0
    assert padded.any()
    assert torch.all(batch["labels"][padded] == IGNORE_INDEX)


def test_truncation_is_counted_in_the_log(tiny_tokenizer, prompt_data, caplog):
    longest = max(len(tokenize_record(tiny_tokenizer, r, "prompt_completion").input_ids) for r in prompt_data)
    records = [*prompt_data, {"prompt": "Date: May 1, 1999\nISO:", "completion": " 1999-05-01" * 10}]
    dm = CausalLMDataModule(tiny_tokenizer, records, max_length=longest, batch_size=4)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "train: 1 of 13 samples were longer than max_length" in caplog.text
    assert all(len(s.input_ids) <= longest for s in dm.train_samples)


def test_shuffle_is_deterministic_by_seed_and_epoch():
    a = list(EpochShuffleSampler(50, seed=3))
    b = list(EpochShuffleSampler(50, seed=3))
    c = EpochShuffleSampler(50, seed=3)
    c.set_epoch(1)
    assert a == b and a != list(c) and sorted(a) == list(range(50))
    shards = [list(EpochShuffleSampler(50, 3, True, 2, r)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(50))


def test_step_token_counter_stamps_the_whole_accumulation_group():
    def batch(n_tokens):
        labels = torch.full((1, 6), IGNORE_INDEX)
        labels[0, :n_tokens] = 1
        return {"labels": labels}

    stamped = list(StepTokenCounter([batch(2), batch(3), batch(4), batch(1), batch(5)], accumulate_grad_batches=2))
    assert [int(b["num_label_tokens"]) for b in stamped] == [5, 5, 5, 5, 5]
    stamped = list(StepTokenCounter([batch(2), batch(3), batch(4)], accumulate_grad_batches=2))
    assert [int(b["num_label_tokens"]) for b in stamped] == [5, 5, 4]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sources_jsonl_csv_parquet_and_datasets_folder_read_the_same(tmp_path, prompt_data):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = _write(tmp_path / "d.jsonl", prompt_data)
    csv_path = tmp_path / "d.csv"
    import csv

    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(prompt_data)
    pq.write_table(pa.Table.from_pylist(prompt_data), tmp_path / "d.parquet")
    datasets.Dataset.from_list(prompt_data).save_to_disk(str(tmp_path / "ds"))
    for source in (jsonl, csv_path, tmp_path / "d.parquet", tmp_path / "ds"):
        records, fmt = load_records(source)
        assert fmt == "prompt_completion" and records == prompt_data, source


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataSourceError, match="data file not found: .*nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")


def test_malformed_jsonl_line_gives_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataSourceError, match=r"bad.jsonl:3: malformed JSON"):
        read_records(path)


def test_missing_field_names_the_record_and_field(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DataFormatError, match=r"d.jsonl:2: missing field 'completion'"):
        load_records(path)


def test_empty_data_set_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataSourceError, match="empty"):
        read_records(path)


def test_unknown_file_type_is_an_error(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("x")
    with pytest.raises(DataSourceError, match="unknown data file type"):
        read_records(path)


def test_demo_task_splits_are_disjoint_and_deterministic(tmp_path):
    train = date_records(300, 0, "train")
    test = date_records(100, 0, "test")
    assert train == date_records(300, 0, "train")
    answers = lambda rs: {r["messages"][-1]["content"] for r in rs}  # noqa: E731
    assert not answers(train) & answers(test)
    train_path, test_path = write_demo_data(tmp_path, 10, 5)
    assert len(train_path.read_text().splitlines()) == 10 and len(test_path.read_text().splitlines()) == 5
