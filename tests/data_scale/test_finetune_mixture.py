"""A real `hfbridge finetune` of a tiny model on two sources of different formats: the realised shares in
summary.json against a hand count, the second run (from the saved config.yaml) reading the tokenization cache,
and bad input stopping the run before any model is loaded."""

import json

import pytest
from transformers import AutoTokenizer

from hfbridge import cli
from hfbridge.data.formats import tokenize_record
from hfbridge.data.mixture import draw


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CHAT = [{"messages": [{"role": "user", "content": f"Convert March {i + 1}, 2021"},
                      {"role": "assistant", "content": f"2021-03-{i + 1:02d}"}]} for i in range(20)]
PAIRS = [{"prompt": f"Date: May {i + 1}, 1999\nISO:", "completion": f" 1999-05-{i + 1:02d}"} for i in range(12)]


def test_two_sources_of_different_formats_report_their_shares(tiny_model_dir, tmp_path, capsys):
    chat, pairs = _jsonl(tmp_path / "chat.jsonl", CHAT), _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cache, first, again = tmp_path / "cache", tmp_path / "first", tmp_path / "again"
    common = ["--no-progress-bar", "--batch-size", "4", "--max-steps", "2", "--max-new-tokens", "2",
              "--eval-samples", "2", "--show-samples", "0"]
    assert cli.main(["finetune", "--model", str(tiny_model_dir), "--data", f"{chat}:3", "--data", f"{pairs}:1",
                     "--cache-dir", str(cache), "--test-data", str(pairs), "--output", str(first), *common]) == 0
    out = capsys.readouterr().out
    assert out.count("tokenization cache: miss") == 2 and "[0] " + str(chat) in out

    # By hand: budgets 20 and 12, shares 3/4 and 1/4: T = min(floor(20 * 4/3), 12 * 4) = 26 -> 19.5 and 6.5; the
    # tie of remainders goes to the earlier source: 20 chat samples (all, in order) and 6 drawn pairs.
    summary = json.loads((first / "summary.json").read_text())
    mix = summary["data_mixture"]
    assert [s["samples"] for s in mix["sources"]] == [20, 6]
    assert [s["format"] for s in mix["sources"]] == ["messages", "prompt_completion"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat_tokens = sum(tokenize_record(tok, r, "messages", 512).num_label_tokens for r in CHAT)
    pair_tokens = sum(tokenize_record(tok, PAIRS[j], "prompt_completion", 512).num_label_tokens
                      for j in draw(12, 6, seed=0, position=1))
    assert [s["label_tokens"] for s in mix["sources"]] == [chat_tokens, pair_tokens]
    assert mix["sources"][0]["sample_share"] == round(20 / 26, 6)
    assert mix["sources"][1]["label_token_share"] == round(pair_tokens / (chat_tokens + pair_tokens), 6)
    assert summary["data"]["train"] == [str(chat), str(pairs)]

    # The saved config runs the same run: same mixture, and the tokenized samples come from the cache.
    assert cli.main(["finetune", "--config", str(first / "config.yaml"), "--output", str(again)]) == 0
    out = capsys.readouterr().out
    assert out.count("tokenization cache: hit") == 2 and "tokenization cache: miss" not in out
    assert json.loads((again / "summary.json").read_text())["data_mixture"] == mix


@pytest.mark.parametrize("data, message", [
    (lambda t: [f"{t}/chat.jsonl:0"], r"data.train\[0\]: the weight in .*must be a positive number"),
    (lambda t: [f"{t}/chat.jsonl:two"], r"data.train\[0\]: the weight in .*must be a positive number"),
    (lambda t: [f"{t}/chat.jsonl", f"{t}/missing.jsonl:2"], r"data.train\[1\] \(.*missing.jsonl\): data file not"),
    (lambda t: [f"{t}/chat.jsonl", f"{t}/empty.jsonl"], r"data.train\[1\] \(.*empty.jsonl\): .*empty"),
    (lambda t: [f"{t}/chat.jsonl", f"{t}/prefs.jsonl"], r"data.train\[1\] \(.*prefs.jsonl\): holds preference"),
])
def test_bad_input_exits_2_before_loading_a_model(tmp_path, capsys, monkeypatch, data, message):
    import re

    from hfbridge.recipe import tasks

    _jsonl(tmp_path / "chat.jsonl", CHAT)
    _jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    (tmp_path / "empty.jsonl").write_text("")
    monkeypatch.setattr(tasks.TextTask, "check_model", lambda *a, **k: pytest.fail("the model was looked at"))
    argv = ["finetune", "--output", str(tmp_path / "out"), "--no-progress-bar"]
    for item in data(tmp_path):
        argv += ["--data", item]
    assert cli.main(argv) == 2
    assert re.search(message, capsys.readouterr().err), message
