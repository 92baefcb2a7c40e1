"""Hub datasets by name (`--data owner/name`), read offline from a real local `datasets` cache (hub_cache.py builds
it as one online load leaves it): a tiny-model run trains on exactly what a JSONL of the same records gives, a
hub dataset mixes with a file, the resolution rule, and every missing piece is an error before a model loads."""

import json
import re

import pytest
from hub_cache import COMMIT, build_hub_cache

from hfbridge import cli
from hfbridge.data.hub import HubDataset
from hfbridge.data.sources import read_records, resolve_source
from hfbridge.recipe.config import resolve_config
from hfbridge.recipe.tasks import TextTask
from hfbridge.reporting import read_metrics

CHAT = [{"messages": [{"role": "user", "content": f"Convert March {i + 1}, 2021"},
                      {"role": "assistant", "content": f"2021-03-{i + 1:02d}"}]} for i in range(12)]
TEST = [{"messages": [{"role": "user", "content": f"Convert June {i + 1}, 2020"},
                      {"role": "assistant", "content": f"2020-06-{i + 1:02d}"}]} for i in range(3)]
PAIRS = [{"prompt": f"Date: May {i + 1}, 1999\nISO:", "completion": f" 1999-05-{i + 1:02d}"} for i in range(5)]
BAD = [PAIRS[0], PAIRS[1], {"prompt": "Date: May 3, 1999\nISO:"}]  # row 2 has no completion


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    work = tmp_path_factory.mktemp("hub")
    cache = work / "datasets-cache"
    build_hub_cache(cache, "hfbridge-test/tiny-chat", {"default": {"train": CHAT, "test": TEST, "empty": []}}, work)
    build_hub_cache(cache, "hfbridge-test/tiny-multi", {"chat": {"train": CHAT}, "pairs": {"train": PAIRS}}, work)
    build_hub_cache(cache, "hfbridge-test/tiny-bad", {"default": {"train": BAD}}, work)
    return cache


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hub_cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return hub_cache


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


COMMON = ["--no-progress-bar", "--batch-size", "4", "--max-steps", "2", "--max-new-tokens", "2", "--eval-samples",
          "3", "--show-samples", "0", "--seed", "0"]


def test_a_hub_dataset_trains_on_the_records_a_jsonl_of_them_gives(offline_cache, tiny_model_dir, tmp_path, capsys):
    chat, test = _jsonl(tmp_path / "chat.jsonl", CHAT), _jsonl(tmp_path / "test.jsonl", TEST)
    cache, local, hub = tmp_path / "tokens", tmp_path / "local", tmp_path / "hub"
    assert cli.main(["finetune", "--model", str(tiny_model_dir), "--data", str(chat), "--test-data", str(test),
                     "--cache-dir", str(cache), "--output", str(local), *COMMON]) == 0
    assert "tokenization cache: miss" in capsys.readouterr().out
    assert cli.main(["finetune", "--model", str(tiny_model_dir), "--data", "hfbridge-test/tiny-chat",
                     "--test-data", "hfbridge-test/tiny-chat", "--cache-dir", str(cache), "--output", str(hub),
                     *COMMON]) == 0
    out = capsys.readouterr().out
    # The same records (the content hash is the token cache's key): the JSONL run's entry is read back.
    assert "tokenization cache: hit (train[0] hfbridge-test/tiny-chat" in out
    ours, theirs = (json.loads((run / "summary.json").read_text()) for run in (hub, local))
    mix, ref = ours["data_mixture"], theirs["data_mixture"]
    assert (mix["samples"], mix["label_tokens"]) == (ref["samples"], ref["label_tokens"]) == (12, mix["label_tokens"])
    source = mix["sources"][0]
    assert source["path"] == "hfbridge-test/tiny-chat (split 'train')" and source["split"] == "train"
    assert {k: source[k] for k in ("format", "records", "samples", "label_tokens")} == \
        {k: ref["sources"][0][k] for k in ("format", "records", "samples", "label_tokens")}
    # The test split scored the same three records before training; the first step's loss is the same.
    assert ours["exact_match_before"] == theirs["exact_match_before"] is not None
    assert ours["data"] == {"train": "hfbridge-test/tiny-chat", "test": "hfbridge-test/tiny-chat"}
    first = [read_metrics(run / "metrics.csv")["train_loss"][0] for run in (hub, local)]
    assert first[0] == pytest.approx(first[1], rel=1e-6, abs=1e-6)


def test_a_hub_config_mixes_with_a_file_as_the_same_records_in_files_do(offline_cache, tmp_path):
    """A recipe's mapping entry (hub, config, weight, epochs) and a file: the mixture drawn is the one the same
    records in two JSONL files give (the mixture rule is tested on files in test_mixture_rule.py)."""
    chat, pairs = _jsonl(tmp_path / "chat.jsonl", CHAT), _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    hub_recipe, file_recipe = tmp_path / "hub.yaml", tmp_path / "files.yaml"
    hub_recipe.write_text(f"data:\n  train:\n    - {{hub: hfbridge-test/tiny-multi, config: pairs, weight: 1, "
                          f"epochs: 2}}\n    - {chat}:3\n")
    file_recipe.write_text(f"data:\n  train:\n    - {{path: {pairs}, weight: 1, epochs: 2}}\n    - {chat}:3\n")
    task, reference = TextTask(), TextTask()
    data = task.read_data(resolve_config(hub_recipe), tmp_path)
    expected = reference.read_data(resolve_config(file_recipe), tmp_path)
    assert data.train == expected.train and data.format == expected.format == "messages+prompt_completion"
    assert [len(s.indices) for s in task.mixture.sources] == [len(s.indices) for s in reference.mixture.sources]
    assert task.mixture.sources[0].spec.path.config == "pairs"
    # The same data set named on the command line: --data-config picks the config of names without an entry.
    named = resolve_config(flags={"data": {"train": ["hfbridge-test/tiny-multi:1", f"{chat}:3"],
                                           "hub_config": "pairs"}})
    files = resolve_config(flags={"data": {"train": [f"{pairs}:1", f"{chat}:3"]}})
    drawn = TextTask().read_data(named, tmp_path).train
    assert drawn == TextTask().read_data(files, tmp_path).train and len(drawn) == 16  # 4 pairs, 12 chats


def test_a_local_path_always_wins_and_only_owner_name_is_a_hub_dataset(offline_cache, tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    assert isinstance(resolve_source("hfbridge-test/tiny-chat"), HubDataset)
    assert read_records("hfbridge-test/tiny-chat")[0][1] == CHAT[0]
    datasets.Dataset.from_list(PAIRS).save_to_disk("hfbridge-test/tiny-chat")  # a local folder of that name
    assert resolve_source("hfbridge-test/tiny-chat") == "hfbridge-test/tiny-chat"
    assert not isinstance(resolve_source("hfbridge-test/tiny-chat"), HubDataset)
    rows = read_records("hfbridge-test/tiny-chat")
    assert rows[0] == ("hfbridge-test/tiny-chat row 0", PAIRS[0])
    for text in ("data/train.jsonl", "a/b/c", "notes.csv", "./x/y", "a/.hidden"):
        assert not isinstance(resolve_source(text), HubDataset), text
        with pytest.raises(ValueError, match="data file not found"):
            read_records(text)


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(TextTask, "check_model", lambda *a, **k: pytest.fail("the model was looked at"))


@pytest.mark.parametrize("argv, message", [
    (["--data", "hfbridge-test/absent"],
     r"hub dataset hfbridge-test/absent \(split 'train'\): is not in the local datasets cache \(HF_DATASETS_CACHE="
     r".*datasets-cache\).*download it once online with `python -c \"import datasets; datasets.load_dataset\("
     r"'hfbridge-test/absent'\)\"` or set HF_HUB_OFFLINE=0"),
    (["--data", "hfbridge-test/tiny-chat", "--data-split", "nope"],
     r"hub dataset hfbridge-test/tiny-chat \(config 'default'\): no split 'nope'; its splits: train, test, empty"),
    (["--data", "hfbridge-test/tiny-chat", "--data-config", "nope"],
     r"hub dataset hfbridge-test/tiny-chat \(config 'nope', split 'train'\): no config 'nope' in the local "
     r"datasets cache .*; configs cached: default"),
    (["--data", "hfbridge-test/tiny-chat", "--data-split", "empty"],
     r"hub dataset hfbridge-test/tiny-chat \(config 'default', split 'empty'\): the data set is empty"),
    (["--data", "hfbridge-test/tiny-multi"], r"has several configs in the local datasets cache \(chat, pairs\); "
     r"choose one with --data-config"),
    (["--data", "hfbridge-test/tiny-chat", "--data-revision", "v2"],
     rf"offline, datasets reads the newest cached copy of config 'default', revision '{COMMIT}'.*not 'v2'"),
    (["--data", "hfbridge-test/tiny-bad"],
     r"hub dataset hfbridge-test/tiny-bad \(config 'default', split 'train'\) row 2: missing field 'completion'"),
    (["--data", "{chat}", "--data", "hfbridge-test/tiny-chat:2", "--data-split", "nope"],
     r"data.train\[1\] \(hfbridge-test/tiny-chat\): hub dataset .* no split 'nope'"),
    (["--data", "{chat}", "--val-data", "hfbridge-test/tiny-chat"],
     r"hub dataset hfbridge-test/tiny-chat \(config 'default'\): no split 'validation'; its splits: train, test"),
])
def test_missing_pieces_are_errors_before_any_model_is_loaded(offline_cache, tmp_path, capsys, no_model, argv,
                                                               message):
    chat = _jsonl(tmp_path / "chat.jsonl", CHAT)
    argv = [a.format(chat=chat) for a in argv]
    code = cli.main(["finetune", "--output", str(tmp_path / "out"), "--no-progress-bar", *argv])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert err.startswith("hfbridge finetune: error: ")


@pytest.mark.parametrize("entry, message", [
    ("{hub: hfbridge-test/tiny-chat, path: x.jsonl}", r"data.train\[0\]: give path .* or hub .*, not both"),
    ("{path: x.jsonl, split: test}", r"data.train\[0\].split: only for a hub dataset"),
    ("{hub: tiny-chat}", r"data.train\[0\].hub: a hub dataset is named owner/name"),
    ("{hub: hfbridge-test/tiny-chat, splt: test}", r"data.train\[0\].splt: unknown key \(did you mean 'split'\?\)"),
])
def test_bad_hub_entries_name_their_position(tmp_path, capsys, entry, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  train:\n    - {entry}\n")
    assert cli.main(["finetune", "--config", str(recipe), "--output", str(tmp_path / "out")]) == 2
    assert re.search(message, capsys.readouterr().err)
