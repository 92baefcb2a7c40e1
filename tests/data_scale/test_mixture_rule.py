"""The mixture rule, by hand: counts for weights, caps and epochs, the draw, determinism by seed, and every bad
input rejected before a model is loaded, naming the source."""

import json

import pytest

from hfbridge.data.datamodule import load_records
from hfbridge.data.mixture import build_mixture, draw, mixture_counts, parse_source, parse_sources
from hfbridge.recipe.config import RunConfig, config_yaml, parse_run_config, resolve_config


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _pc(n, tag):
    return [{"prompt": f"{tag} {i}?", "completion": f" {tag}{i}"} for i in range(n)]


def test_counts_follow_the_weights_until_the_first_source_runs_out():
    # budgets 100 and 40, weights 3:1 -> T = min(100 / (3/4), 40 / (1/4)) = min(133, 160) = 133
    assert mixture_counts([100, 40], [3, 1]) == [100, 33]
    # equal weights: the smaller source decides, T = 2 * 40
    assert mixture_counts([100, 40], [1, 1]) == [40, 40]
    # one source: all of it
    assert mixture_counts([17], [5]) == [17]
    # largest remainder: T = floor(10 / (1/3)) = 30 -> 10, 10, 10; T*p exact; then weights 1:1:1 with budgets 10, 11, 12
    assert mixture_counts([10, 11, 12], [1, 1, 1]) == [10, 10, 10]
    # 2:1:1 with budgets 7, 100, 100: T = floor(7 * 2) = 14 -> 7, 3.5, 3.5: the earlier source gets the extra one
    assert mixture_counts([7, 100, 100], [2, 1, 1]) == [7, 4, 3]
    # decimal weights are exact (0.1 + 0.2 is not 0.3 in floats)
    assert mixture_counts([10, 20, 30], [0.1, 0.2, 0.3]) == [10, 20, 30]


def test_a_draw_is_whole_passes_then_a_seeded_subset_in_file_order():
    assert draw(4, 8, seed=0, position=0) == [0, 1, 2, 3, 0, 1, 2, 3]
    part = draw(10, 13, seed=0, position=0)
    assert part[:10] == list(range(10)) and len(set(part[10:])) == 3 and part[10:] == sorted(part[10:])
    assert draw(10, 13, 0, 0) == draw(10, 13, 0, 0)
    assert draw(1000, 10, 0, 0) != draw(1000, 10, 1, 0) != draw(1000, 10, 1, 1)


def test_caps_epochs_and_weights_give_exact_counts(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", _pc(50, "a"))
    b = _jsonl(tmp_path / "b.jsonl", _pc(30, "b"))
    specs = parse_sources([{"path": str(a), "weight": 3, "max_samples": 20, "epochs": 2}, f"{b}:1"])
    mix = build_mixture(specs, load_records, "auto", seed=0)
    # pools 20 (capped) and 30; budgets 40 and 30; shares 3/4, 1/4; T = min(40 * 4/3, 30 * 4) = 53 -> 39.75, 13.25
    assert [len(s.indices) for s in mix.sources] == [40, 13]
    assert len(mix.records) == 53 and mix.origin == [0] * 40 + [1] * 13
    # source a: its 20 first records twice, in order (39.75 rounds up: the largest remainder)
    assert mix.records[:40] == _pc(20, "a") * 2
    # source b: 13 of its 30 records, drawn by the seed, in file order
    drawn_b = mix.records[40:]
    assert all(r in _pc(30, "b") for r in drawn_b) and len({r["prompt"] for r in drawn_b}) == 13
    assert drawn_b == sorted(drawn_b, key=lambda r: int(r["prompt"].split()[1][:-1]))
    again = build_mixture(specs, load_records, "auto", seed=0)
    other = build_mixture(specs, load_records, "auto", seed=1)
    assert again.records == mix.records and other.records != mix.records


def test_one_plain_source_is_its_records_unchanged(tmp_path):
    records = _pc(9, "x")
    a = _jsonl(tmp_path / "a.jsonl", records)
    mix = build_mixture(parse_sources(str(a)), load_records, "auto", seed=3)
    assert mix.records == records and mix.format == "prompt_completion"


def test_sources_keep_their_own_format(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", _pc(4, "a"))
    b = _jsonl(tmp_path / "b.jsonl", [{"text": f"t {i}"} for i in range(4)])
    mix = build_mixture(parse_sources([str(a), str(b)]), load_records, "auto", seed=0)
    assert mix.formats == ["prompt_completion", "text"] and mix.format == "prompt_completion+text"
    with pytest.raises(ValueError, match="trains on one format"):
        build_mixture(parse_sources([str(a), str(b)]), load_records, "auto", seed=0, mixed_formats=False)


def test_config_lists_flags_and_the_saved_yaml(tmp_path):
    import argparse

    from hfbridge.recipe.config import add_config_arguments, flag_overrides

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    one = resolve_config(flags=flag_overrides(parser.parse_args(["--data", "a.jsonl"])))
    assert one.data.train == "a.jsonl"  # as it has always been
    two = resolve_config(flags=flag_overrides(parser.parse_args(["--data", "a.jsonl:3", "--data", "b.parquet:1"])))
    assert two.data.train == ["a.jsonl:3", "b.parquet:1"]
    assert [(s.path, s.weight) for s in parse_sources(two.data.train)] == [("a.jsonl", 3.0), ("b.parquet", 1.0)]
    listed = parse_run_config({"data": {"train": [{"path": "a.jsonl", "weight": 3, "max_samples": 1000,
                                                   "epochs": 2}, "b.parquet"]}})
    saved = tmp_path / "config.yaml"
    saved.write_text(config_yaml(listed))
    assert resolve_config(saved).data.train == listed.data.train
    assert RunConfig().data.cache is True and RunConfig().data.rebuild_cache is False


@pytest.mark.parametrize("train, message", [
    (["a.jsonl:0", "b.jsonl"], r"data.train\[0\]: the weight in 'a.jsonl:0': must be a positive number"),
    (["a.jsonl:-2", "b.jsonl"], "must be a positive number, got '-2'"),
    (["a.jsonl", "b.jsonl:heavy"], r"data.train\[1\]: the weight in 'b.jsonl:heavy': must be a positive number"),
    (["a.jsonl:", "b.jsonl"], r"data.train\[0\]: 'a.jsonl:' is not PATH or PATH:WEIGHT"),
    (["a.jsonl", ":3"], r"data.train\[1\]: ':3' is not PATH or PATH:WEIGHT"),
    (["a.jsonl", {"path": "b.jsonl", "weight": "lots"}], r"data.train\[1\].weight: must be a positive number"),
    (["a.jsonl", {"path": "b.jsonl", "weight": float("nan")}], r"data.train\[1\].weight: must be a positive"),
    (["a.jsonl", {"path": "b.jsonl", "epochs": 0}], r"data.train\[1\].epochs: must be an integer >= 1"),
    (["a.jsonl", {"path": "b.jsonl", "max_samples": 2.5}], r"data.train\[1\].max_samples: must be an integer"),
    (["a.jsonl", {"path": "b.jsonl", "wieght": 2}], r"data.train\[1\].wieght: unknown key \(did you mean 'weight'"),
    (["a.jsonl", {"weight": 2}], r"data.train\[1\].path: required"),
    ([], "data.train: an empty list"),
])
def test_bad_sources_are_clear_config_errors(train, message):
    with pytest.raises(ValueError, match=message):
        parse_run_config({"data": {"train": train}})


def test_bad_files_are_named_with_their_position(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", _pc(4, "a"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    cases = [
        ([str(a), str(tmp_path / "gone.jsonl")], r"data.train\[1\] \(.*gone.jsonl\): data file not found"),
        ([str(a), str(empty)], r"data.train\[1\] \(.*empty.jsonl\): .*empty"),
        ([str(a), str(pairs)], r"data.train\[1\] \(.*pairs.jsonl\): holds preference records"),
        ([str(bad), str(a)], r"data.train\[0\] \(.*bad.jsonl\): .*cannot tell the format"),
    ]
    for train, message in cases:
        with pytest.raises(ValueError, match=message):
            build_mixture(parse_sources(train), load_records, "auto", seed=0, task_label="--method sft")
    with pytest.raises(ValueError, match=r"pairs.jsonl: holds preference records"):  # one source, too
        build_mixture(parse_sources(str(pairs)), load_records, "auto", seed=0, task_label="--method sft")
    assert parse_source(str(a)).path == str(a)  # an existing file is never split at a colon
