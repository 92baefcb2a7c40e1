"""Saved declarative folders cannot turn on remote code; predict refuses an output it cannot write before it
loads anything."""

import pytest
from decl_helpers import date_rows, make_config

from hfbridge import cli
from hfbridge.declarative import LLM
from hfbridge.declarative.dataset import write_rows
from hfbridge.declarative.llm import load_llm
from hfbridge.models import loading


def test_a_saved_folder_cannot_ask_for_remote_code(tiny_model_dir, tmp_path, monkeypatch):
    cfg = make_config(tiny_model_dir, trainer={"type": "none"}, model_parameters={"trust_remote_code": True})
    LLM(cfg).save(tmp_path / "saved")
    seen = []
    real = loading.resolve_model_path
    monkeypatch.setattr(loading, "resolve_model_path", lambda name, trust: seen.append(trust) or real(name, trust))
    assert load_llm(tmp_path / "saved").config_obj.model_parameters.trust_remote_code is False
    assert seen and not any(seen)
    load_llm(tmp_path / "saved", trust_remote_code=True)  # the caller may
    assert seen[-1] is True


def test_predict_refuses_an_unknown_output_type_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(make_config(tiny_model_dir, trainer={"type": "none"})))
    write_rows(date_rows(2), tmp_path / "d.csv")
    monkeypatch.setattr(LLM, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["predict", "--config", str(tmp_path / "c.yaml"), "--data", str(tmp_path / "d.csv"),
                     "--output", str(tmp_path / "p.txt")]) == 2
    assert "unknown file type '.txt'; use .csv, .jsonl or .parquet" in capsys.readouterr().err
