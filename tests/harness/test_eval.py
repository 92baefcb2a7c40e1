"""``hfbridge eval``: lm-evaluation-harness tasks on models hfbridge loads, checked against lm-eval run directly on
the same folder, the bundled tasks against the demo task they come from, and every bad input refused before the
model loads."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from hfbridge import cli
from hfbridge.harness import bundled
from hfbridge.harness import lm_eval_runner as runner
from hfbridge.models import loading

pytest.importorskip("lm_eval")

TASKS = "hfbridge_dates,hfbridge_dates_mc"


def _bundled_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(bundled.TASKS_DIR), include_defaults=False)


def test_the_shipped_data_is_what_the_demo_task_generates(tmp_path):
    from hfbridge.data.demo import date_records

    written = bundled.write_bundled_data(tmp_path)
    for path in written:
        assert path.read_text() == (bundled.TASKS_DIR / path.name).read_text(), f"regenerate {path.name}"
    test = [json.loads(line) for line in (bundled.TASKS_DIR / "dates_test.jsonl").read_text().splitlines()]
    demo = date_records(100, 0, "test", "messages")  # what `hfbridge finetune` holds out on the demo task
    assert [(r["question"], r["answer"]) for r in test] == [
        (d["messages"][1]["content"], d["messages"][2]["content"]) for d in demo]
    for record in test:
        assert len(set(record["choices"])) == 4 and record["choices"][record["label"]] == record["answer"]
    train_answers = {json.loads(line)["answer"] for line in (bundled.TASKS_DIR / "dates_train.jsonl").open()}
    assert not train_answers & {r["answer"] for r in test}  # few-shot examples never show a held-out date


def test_the_bundled_prompts_are_the_demo_tasks_prompts():
    from hfbridge.data.demo import date_records

    loaded = _bundled_manager().load(["hfbridge_dates", "hfbridge_dates_mc"])["tasks"]
    reference = date_records(3, 0, "test", "prompt_completion")
    for task in loaded.values():
        docs = list(task.test_docs())[:3]
        assert [task.fewshot_context(d, 0) for d in docs] == [r["prompt"] for r in reference]
        assert [task.doc_to_target(d) for d in docs] == (
            [r["completion"].strip() for r in reference] if task.OUTPUT_TYPE == "generate_until"
            else [d["label"] for d in docs])


def test_scores_agree_with_lm_eval_run_directly_on_the_folder(tiny_model_dir, tmp_path, capsys):
    """The same numbers as ``lm_eval --model hf --model_args pretrained=<folder>``: every metric and stderr, and,
    through the in-memory path with samples logged, every generated answer and every choice's log-likelihood."""
    import lm_eval

    out = tmp_path / "results.json"
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--tasks", TASKS, "--limit", "6", "--batch-size", "4",
                     "--device", "cpu", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hfbridge_dates_mc" in printed and "acc" in printed and "exact_match" in printed
    ours = json.loads(out.read_text())
    direct = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32", tasks=TASKS.split(","),
        task_manager=_bundled_manager(), limit=6, batch_size=4, device="cpu", log_samples=True)
    assert ours["lm_eval"]["results"] == json.loads(json.dumps(direct["results"]))
    assert ours["lm_eval"]["n-samples"] == direct["n-samples"]
    assert set(ours["metrics"]) == {"hfbridge_dates", "hfbridge_dates_mc"}
    assert ours["metrics"]["hfbridge_dates_mc"]["acc"] == direct["results"]["hfbridge_dates_mc"]["acc,none"]

    model, tokenizer = loading.load_for_inference(tiny_model_dir, "float32")
    tasks = runner.prepare_tasks(TASKS.split(","))
    in_memory = runner.evaluate(model, tokenizer, tasks, limit=6, batch_size=4, log_samples=True)
    for task in TASKS.split(","):
        a, b = in_memory["samples"][task], direct["samples"][task]
        assert [s["filtered_resps"] for s in a] == [s["filtered_resps"] for s in b]
        assert [s["doc_id"] for s in a] == list(range(6))
    generated = [s["filtered_resps"][0] for s in in_memory["samples"]["hfbridge_dates"]]
    assert any(g.strip() for g in generated)  # the tiny model does answer (wrongly): the strings are compared

    # The multiple-choice scores by hand: log P(" " + choice | prompt) summed over the choice's tokens.
    for sample in in_memory["samples"]["hfbridge_dates_mc"][:3]:
        doc = sample["doc"]
        assert [a[1] for a in sample["arguments"]] == [" " + c for c in doc["choices"]]
        prompt = sample["arguments"][0][0]
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            whole = tokenizer(prompt + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = model(ids).logits.log_softmax(-1)[0]
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(scores, abs=1e-4)
        assert sample["acc"] == float(max(range(4), key=scores.__getitem__) == doc["label"])


def test_any_model_hfbridge_loads_a_run_folder_and_an_adapter_folder(tiny_model_dir, tmp_path, monkeypatch):
    """A ``finetune`` run folder resolves to its ``model/``; an adapter folder to its base with the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "run" / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    seen = []
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda model, *a, **k: seen.append(type(model).__name__) or real(model, *a, **k))
    results = []
    for model in (tmp_path / "run", adapter):
        out = tmp_path / f"r{len(results)}.json"
        assert cli.main(["eval", "--model", str(model), "--tasks", "hfbridge_dates_mc", "--limit", "4",
                         "--device", "cpu", "--output", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert seen == ["PeftModel", "PeftModel"]
    assert [r["loaded_from"] for r in results] == [str(adapter), str(adapter)]
    assert results[0]["lm_eval"]["results"] == results[1]["lm_eval"]["results"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must be refused before any weights are read."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_for_inference", refuse)
    monkeypatch.setattr(loading, "load_pretrained_model", refuse)


def _fails(capsys, *argv) -> str:
    assert cli.main(["eval", *argv]) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch, no_model_load):
    model = ["--model", str(tiny_model_dir)]
    err = _fails(capsys, *model, "--tasks", "hfbridge_dates", "--limit", "0")
    assert "--limit must be a whole number of at least 1" in err and "got 0" in err
    assert "--limit" in _fails(capsys, *model, "--tasks", "hfbridge_dates", "--limit", "-2")
    assert "--num-fewshot" in _fails(capsys, *model, "--tasks", "hfbridge_dates", "--num-fewshot", "-1")
    assert "--batch-size" in _fails(capsys, *model, "--tasks", "hfbridge_dates", "--batch-size", "0")
    err = _fails(capsys, "--model", str(tmp_path / "missing"), "--tasks", "hfbridge_dates")
    assert "not found" in err and "missing" in err
    assert "GGUF file not found" in _fails(capsys, "--model", str(tmp_path / "m.gguf"), "--tasks", "hfbridge_dates")
    assert "no tasks given" in _fails(capsys, *model, "--tasks", " , ")

    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}')
    assert "exists; hfbridge does not replace files" in _fails(
        capsys, *model, "--tasks", "hfbridge_dates", "--output", str(foreign))
    assert foreign.read_text() == '{"mine": true}'
    assert "is a folder" in _fails(capsys, *model, "--tasks", "hfbridge_dates", "--output", str(tmp_path))
    assert "does not exist" in _fails(capsys, *model, "--tasks", "hfbridge_dates", "--output",
                                      str(tmp_path / "no" / "r.json"))

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval not installed
    err = _fails(capsys, *model, "--tasks", "hfbridge_dates")
    assert 'pip install "hfbridge[eval]"' in err


def test_a_results_file_is_written_whole_and_never_replaced(tmp_path):
    path = tmp_path / "results.json"
    runner.write_results(path, {"metrics": {"a": {"acc": 0.5}}})
    assert json.loads(path.read_text()) == {"writer": runner.RESULTS_WRITER, "metrics": {"a": {"acc": 0.5}}}
    with pytest.raises(FileExistsError, match="does not replace files"):
        runner.write_results(path, {"metrics": {}})
    assert json.loads(path.read_text())["metrics"]["a"]["acc"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


def _fake_hub_cache(cache, repo_id: str, config: str, splits: dict[str, list[dict]], tmp_path) -> None:
    """A hub data set as the ``datasets`` cache holds it after one online load (what offline mode reads)."""
    import shutil

    import datasets

    files = {}
    for split, rows in splits.items():
        files[split] = str(tmp_path / f"{split}.jsonl")
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = datasets.load_dataset_builder("json", data_files=files, cache_dir=str(tmp_path / "build"))
    builder.download_and_prepare()
    source = next(p for p in (tmp_path / "build" / "json").glob("*/*/*") if p.is_dir())
    owner, name = repo_id.split("/")
    target = cache / f"{owner}___{name}" / config / "0.0.0" / source.name
    target.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, target / f.name.replace("json-", f"{name}-"))
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(config_name=config, dataset_name=name, builder_name=name)
    (target / "dataset_info.json").write_text(json.dumps(info))


def test_lm_eval_tasks_run_offline_from_the_datasets_cache_and_uncached_ones_are_named(
        tiny_model_dir, tmp_path, capsys, monkeypatch, small_registry):
    """``arc_easy`` (lm-eval's own task) with its data set in the local cache runs offline and agrees with lm-eval
    run directly; with an empty cache it is an error naming the task, before the model loads; a misspelt name
    gets the nearest names."""
    import datasets
    import lm_eval

    cache = tmp_path / "datasets-cache"
    rows = [{"id": str(i), "question": f"Which number follows {i}?",
             "choices": {"text": [str(i + 1), str(i + 2), str(i - 1), "zero"], "label": ["A", "B", "C", "D"]},
             "answerKey": "A"} for i in range(5)]
    _fake_hub_cache(cache, "allenai/ai2_arc", "ARC-Easy", {"train": rows, "validation": rows, "test": rows},
                    tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    out = tmp_path / "arc.json"
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--tasks", "arc_easy", "--limit", "5", "--device", "cpu",
                     "--output", str(out)]) == 0
    ours = json.loads(out.read_text())["lm_eval"]["results"]
    direct = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32", tasks=["arc_easy"],
        task_manager=runner.task_manager(["arc_easy"]), limit=5, batch_size=16, device="cpu")
    assert ours == json.loads(json.dumps(direct["results"]))
    assert ours["arc_easy"]["sample_len"] == 5

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the tasks were checked")

    monkeypatch.setattr(loading, "load_for_inference", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    err = _fails(capsys, "--model", str(tiny_model_dir), "--tasks", "hfbridge_dates,arc_easy")
    assert "task 'arc_easy'" in err and "not in the local datasets cache" in err and "allenai/ai2_arc" in err
    err = _fails(capsys, "--model", str(tiny_model_dir), "--tasks", "hfbridge_date,arc_eazy")
    assert "unknown task 'hfbridge_date'; did you mean hfbridge_dates" in err
    assert "unknown task 'arc_eazy'; did you mean arc_easy" in err
