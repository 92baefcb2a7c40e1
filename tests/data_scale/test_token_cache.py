"""The tokenization cache: a second call reads what the first wrote, identical to tokenizing; a changed record,
tokenizer, chat template, format or max_length misses; --rebuild-cache rebuilds; parallel equals serial."""

import copy

import pytest

from hfbridge.data.formats import tokenize_record
from hfbridge.data.token_cache import cached_tokenize, tokenize_parallel
from hfbridge.testing import build_tiny_tokenizer


def _chat(n):
    return [{"messages": [{"role": "user", "content": f"Convert March {i + 1}, 2021"},
                          {"role": "assistant", "content": f"2021-03-{i % 28 + 1:02d}"}]} for i in range(n)]


def _reference(tok, records, fmt, max_length):
    return [tokenize_record(tok, r, fmt, max_length) for r in records]


def _entries(root):
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def test_hit_after_miss_and_the_same_samples(tiny_tokenizer, tmp_path, capsys):
    records = _chat(12)
    first, status = cached_tokenize(tiny_tokenizer, records, "messages", 64, root=tmp_path)
    assert status == "miss" and "tokenization cache: miss" in capsys.readouterr().out
    second, status = cached_tokenize(tiny_tokenizer, records, "messages", 64, root=tmp_path)
    assert status == "hit" and "tokenization cache: hit" in capsys.readouterr().out
    assert first == second == _reference(tiny_tokenizer, records, "messages", 64)
    assert any(s.truncated for s in _reference(tiny_tokenizer, records, "messages", 8))
    cut, _ = cached_tokenize(tiny_tokenizer, records, "messages", 8, root=tmp_path)
    again, status = cached_tokenize(tiny_tokenizer, records, "messages", 8, root=tmp_path)
    assert status == "hit" and again == cut == _reference(tiny_tokenizer, records, "messages", 8)  # flags kept
    assert len(_entries(tmp_path)) == 2


def test_every_input_of_the_key_invalidates(tiny_tokenizer, tmp_path):
    records = _chat(6)
    assert cached_tokenize(tiny_tokenizer, records, "messages", 64, root=tmp_path)[1] == "miss"
    changed = copy.deepcopy(records)
    changed[3]["messages"][1]["content"] = "2021-03-99"  # one record of a file edited
    assert cached_tokenize(tiny_tokenizer, changed, "messages", 64, root=tmp_path)[1] == "miss"
    assert cached_tokenize(tiny_tokenizer, records[:5], "messages", 64, root=tmp_path)[1] == "miss"  # a cap
    assert cached_tokenize(tiny_tokenizer, records, "messages", 32, root=tmp_path)[1] == "miss"  # max_length
    templated = copy.deepcopy(tiny_tokenizer)
    templated.chat_template = "{{ 'Dates. ' }}" + tiny_tokenizer.chat_template
    assert templated.chat_template != tiny_tokenizer.chat_template
    samples, status = cached_tokenize(templated, records, "messages", 64, root=tmp_path)
    assert status == "miss" and samples == _reference(templated, records, "messages", 64)
    other = build_tiny_tokenizer(vocab_size=400)  # another vocabulary, same template and special tokens
    samples, status = cached_tokenize(other, records, "messages", 64, root=tmp_path)
    assert status == "miss" and samples == _reference(other, records, "messages", 64)
    # nothing stale was read: each of the six is its own entry, and the first is still a hit
    assert len(_entries(tmp_path)) == 6
    assert cached_tokenize(tiny_tokenizer, records, "messages", 64, root=tmp_path)[1] == "hit"


def test_rebuild_replaces_the_entry_and_off_writes_nothing(tiny_tokenizer, tmp_path):
    records = [{"text": f"line {i}"} for i in range(5)]
    cached_tokenize(tiny_tokenizer, records, "text", 16, root=tmp_path)
    (entry,) = _entries(tmp_path)
    (tmp_path / entry / "input_ids.npy").write_bytes(b"corrupt")  # a damaged entry is a miss, never an error
    assert cached_tokenize(tiny_tokenizer, records, "text", 16, root=tmp_path)[1] == "miss"
    assert cached_tokenize(tiny_tokenizer, records, "text", 16, root=tmp_path, rebuild=True)[1] == "rebuilt"
    assert cached_tokenize(tiny_tokenizer, records, "text", 16, root=tmp_path)[1] == "hit"
    off = tmp_path / "off"
    samples, status = cached_tokenize(tiny_tokenizer, records, "text", 16, root=off, enabled=False)
    assert status == "off" and not off.exists() and samples == _reference(tiny_tokenizer, records, "text", 16)


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion"])
def test_parallel_tokenization_equals_serial(tiny_tokenizer, fmt):
    records = _chat(40) if fmt == "messages" else [{"prompt": f"Q{i} ?", "completion": f" A{i}"} for i in range(40)]
    serial = _reference(tiny_tokenizer, records, fmt, 24)
    parallel = tokenize_parallel(tiny_tokenizer, records, fmt, 24, threshold=10, processes=2)
    assert parallel == serial
