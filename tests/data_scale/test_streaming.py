"""Streaming training data (``--streaming``): lazy readers that agree with the in-memory ones record for record and
error for error, micro-batches equal to the in-memory path's in the same order (one rank and several), resuming
at a micro-batch, refusals before any model loads, and a real `hfbridge finetune --streaming` killed after a
checkpoint and resumed to the losses and weights of a run that was never interrupted."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from hfbridge import cli
from hfbridge.data.datamodule import CausalLMDataModule, EpochShuffleSampler
from hfbridge.data.sources import DataSourceError, read_records
from hfbridge.data.streaming import StreamingDataModule, iter_rows, open_stream

PAIRS = [{"prompt": f"Date: May {i + 1}, 1999\nISO:", "completion": f" 1999-05-{i % 28 + 1:02d}" + " x" * (i % 5)}
         for i in range(23)]


def _jsonl(path, records, blank_every=0):
    lines = []
    for i, r in enumerate(records):
        lines.append(json.dumps(r) + "\n")
        if blank_every and i % blank_every == 0:
            lines.append("\n")
    path.write_text("\ufeff" + "".join(lines), encoding="utf-8")
    return path


def _csv(path, records):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def _parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=5)  # several row groups to skip over
    return path


@pytest.mark.parametrize("write", [lambda p: _jsonl(p / "a.jsonl", PAIRS, blank_every=4),
                                   lambda p: _csv(p / "a.csv", PAIRS), lambda p: _parquet(p / "a.parquet", PAIRS)])
def test_lazy_readers_give_the_in_memory_records_from_any_start(tmp_path, write):
    path = write(tmp_path)
    expected = read_records(path)
    assert list(iter_rows(path)) == expected  # same records, same `where` (file:line, or row)
    for start in (1, 5, 7, 22, 23, 30):
        assert list(iter_rows(path, start)) == expected[start:], start


BAD_FILES = {
    "malformed": lambda p: p.write_text('{"text": "a"}\n\n{"text": "b"\n'),
    "not an object": lambda p: p.write_text('{"text": "a"}\n[1, 2]\n'),
    "not utf-8": lambda p: p.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n'),
    "csv columns": lambda p: p.write_text('text\nfine\n"a",b\n'),
    "parquet": lambda p: p.write_bytes(b"PAR1 not really"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_file_fails_with_the_in_memory_error_text(tmp_path, name):
    path = tmp_path / ("a.csv" if name.startswith("csv") else "a.parquet" if name == "parquet" else "a.jsonl")
    BAD_FILES[name](path)
    with pytest.raises(DataSourceError) as in_memory:
        read_records(path)
    with pytest.raises(DataSourceError) as streamed:
        list(iter_rows(path))
    if name == "parquet":  # the same text around pyarrow's own message (which differs by pyarrow entry point)
        assert str(streamed.value).startswith(f"{path}: not a readable Parquet file (")
        assert str(in_memory.value).startswith(f"{path}: not a readable Parquet file (")
    else:
        assert str(streamed.value) == str(in_memory.value)


def test_a_late_bad_record_is_met_only_when_reached_naming_its_line(tmp_path, tiny_tokenizer):
    records = PAIRS * 6  # 138 records: more than open_stream checks up front
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"prompt": "p"}\n')
    source = open_stream(path)  # the first records are checked; the bad one (line 139) is not read yet
    dm = StreamingDataModule(tiny_tokenizer, source, max_length=64, batch_size=4, packing=True)
    batches = iter(dm.train_dataloader())
    assert next(batches)["input_ids"].shape[0] >= 1  # a batch is ready long before the end of the file
    with pytest.raises(ValueError, match=rf"{path}:139: missing field 'completion' for format 'prompt_completion'"):
        list(batches)


def _in_memory_batches(dm: CausalLMDataModule, world: int, rank: int, batch_size: int):
    """The in-memory path's micro-batches in file order (its sampler without shuffling), packed."""
    sampler = EpochShuffleSampler(len(dm.train_samples), shuffle=False, num_replicas=world, rank=rank)
    return list(DataLoader(dm.train_samples, batch_size=batch_size, sampler=sampler, collate_fn=dm.packed_collator))


def _equal(a: dict, b: dict) -> bool:
    keys = a.keys() - {"num_label_tokens"}
    return keys == b.keys() - {"num_label_tokens"} and all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("world", [1, 3])
def test_streamed_micro_batches_equal_the_in_memory_ones_in_file_order(tmp_path, tiny_tokenizer, world):
    path = _jsonl(tmp_path / "a.jsonl", PAIRS)
    options = dict(max_length=31, batch_size=3, packing=True, pack_length=64)
    memory = CausalLMDataModule(tiny_tokenizer, str(path), **options)
    memory.setup("fit")
    assert 0 < sum(s.truncated for s in memory.train_samples) < 23  # truncation is part of what is compared
    stream = StreamingDataModule(tiny_tokenizer, open_stream(path), **options)
    per_rank = []
    for rank in range(world):
        stream._dp_rank_and_size = lambda rank=rank: (rank, world)
        got = list(stream.train_dataloader())
        expected = _in_memory_batches(memory, world, rank, 3)
        assert len(got) == len(expected) == math.ceil(math.ceil(23 / world) / 3)
        assert all(_equal(g, e) for g, e in zip(got, expected)), (world, rank)
        per_rank.append(got)
        # stamped with the label tokens of their optimizer step (accumulate 1: their own)
        assert [int(b["num_label_tokens"]) for b in got] == [int((b["labels"] != -100).sum()) for b in got]
    # every record once over the ranks (plus the padding of the last round: the first records again)
    tokens = sum(int((b["labels"] != -100).sum()) for got in per_rank for b in got)
    pad = -23 % world
    expected_tokens = sum(s.num_label_tokens for s in memory.train_samples + memory.train_samples[:pad])
    assert tokens == expected_tokens


@pytest.mark.parametrize("world, start", [(1, 2), (1, 7), (1, 8), (2, 3), (2, 4), (3, 3)])
def test_resuming_at_a_micro_batch_gives_the_rest_of_the_pass(tmp_path, tiny_tokenizer, world, start):
    path = _parquet(tmp_path / "a.parquet", PAIRS)
    stream = StreamingDataModule(tiny_tokenizer, open_stream(path), max_length=24, batch_size=3, packing=True)
    for rank in range(world):
        stream._dp_rank_and_size = lambda rank=rank: (rank, world)
        full = list(stream.stream(0))
        resumed = list(stream.stream(start))
        assert len(resumed) == max(len(full) - start, 0)
        assert all(_equal(a, b) for a, b in zip(resumed, full[start:]))


def test_a_micro_batch_drops_samples_with_nothing_to_train(tmp_path, tiny_tokenizer):
    records = [{"prompt": "a long prompt " * 20, "completion": " x"}] + PAIRS[:3]  # truncated to its prompt
    path = _jsonl(tmp_path / "a.jsonl", records)
    stream = StreamingDataModule(tiny_tokenizer, open_stream(path), max_length=31, batch_size=4, packing=False)
    (batch,) = list(stream.train_dataloader())
    memory = CausalLMDataModule(tiny_tokenizer, str(path), max_length=31, batch_size=4, packing=False)
    memory.setup("fit")
    assert len(memory.train_samples) == 3 and batch["input_ids"].shape[0] == 3
    assert stream.batches.dropped == 1
    assert _equal(batch, memory.collator(memory.train_samples))


# --------------------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("extra, message", [
    ("--data {a} --method dpo", r"data.streaming: --task text-generation --method dpo reads every record"),
    ("--data {a} --task image-text-to-text", r"data.streaming: --task image-text-to-text --method sft"),
    ("--data {a} --data {b} --max-steps 2", r"data.streaming: a mixture of 2 sources cannot be streamed"),
    ("--data {a} --schedule constant", r"no known length, which warmup_ratio 0.05 need; give --max-steps N"),
    ("--data {a}", r"no known length, which the cosine schedule and warmup_ratio 0.05 need; give --max-steps N"),
    ("--data {bad} --max-steps 2", r"bad.jsonl:2: missing field 'completion' for format 'prompt_completion'"),
    ("--data {prefs} --max-steps 2", r"prefs.jsonl: holds preference records"),
    ("--data {empty} --max-steps 2", r"empty.jsonl: the data set is empty"),
])
def test_what_cannot_be_streamed_is_refused_before_a_model_loads(tmp_path, capsys, monkeypatch, extra, message):
    import re

    from hfbridge.recipe import tasks

    paths = {"a": _jsonl(tmp_path / "a.jsonl", PAIRS), "b": _jsonl(tmp_path / "b.jsonl", PAIRS),
             "bad": tmp_path / "bad.jsonl", "prefs": tmp_path / "prefs.jsonl", "empty": tmp_path / "empty.jsonl"}
    paths["bad"].write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "p"}\n' + json.dumps(PAIRS[1]) + "\n")
    paths["prefs"].write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    paths["empty"].write_text("\n")
    for task in (tasks.TextTask, tasks.ImageTextTask):
        monkeypatch.setattr(task, "check_model", lambda *a, **k: pytest.fail("the model was looked at"))
    argv = ["finetune", "--streaming", "--output", str(tmp_path / "out"), "--no-progress-bar",
            *extra.format(**paths).split()]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "hfbridge finetune: error:" in err and re.search(message, err), err


# --------------------------------------------------------------------------------------------------- kill and resume
def _argv(model_dir, train, folder, out, resume=False):
    """`hfbridge finetune --streaming`: checkpoints every 2 steps, 2 micro-batches a step, 2 epochs of 12 records
    (3 steps each) cut at 4 steps."""
    return ["finetune", "--streaming", "--model", str(model_dir), "--data", str(train), "--output", str(folder / out),
            "--full", "--batch-size", "2", "--accumulate", "2", "--epochs", "2", "--max-steps", "4", "--lr", "1e-3",
            "--no-progress-bar", "--save-every", "2", "--checkpoint-dir", str(folder / "ck"),
            *(["--resume"] if resume else [])]


def _killed_run(argv, after_step):
    """The run in a fresh process, killed (SIGKILL) in the middle of the step after ``after_step``."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from hfbridge import cli
        from hfbridge.models.causal_lm import HFAutoModelForCausalLM
        original = HFAutoModelForCausalLM.training_step
        def training_step(self, batch, batch_idx=None):
            if self.trainer.global_step == {after_step} and batch_idx % 2 == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, batch, batch_idx)
        HFAutoModelForCausalLM.training_step = training_step
        sys.exit(cli.main({argv!r}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _losses(folder) -> dict[int, float]:
    with (folder / "metrics.csv").open() as f:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(f) if row["train_loss"]}


def test_a_killed_streamed_run_resumes_to_the_uninterrupted_losses_and_weights(tiny_model_dir, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", PAIRS[:12])
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    killed = _killed_run(_argv(tiny_model_dir, train, cut, "out"), after_step=2)  # beside the reference run
    assert cli.main(_argv(tiny_model_dir, train, ref, "out")) == 0
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    assert (cut / "ck" / "step-00000002").is_dir() and not (cut / "out").exists()
    assert cli.main(_argv(tiny_model_dir, train, cut, "resumed", resume=True)) == 0

    expected, got = _losses(ref / "out"), _losses(cut / "resumed")
    # resumed at step 2 (epoch 0, 4 of its 6 micro-batches trained): step 3 ends epoch 0, step 4 starts epoch 1
    assert sorted(expected) == [0, 1, 2, 3] and sorted(got) == [2, 3]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    a = load_file(ref / "out" / "model" / "model.safetensors")
    b = load_file(cut / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
