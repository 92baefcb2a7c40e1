"""``hfbridge serve``: what it refuses before any weights load (exit status 2), and what ``--model`` may name."""

import ast
import socket
from pathlib import Path

import pytest
from serve_helpers import client_for

from hfbridge import cli
from hfbridge.serving import model as served_models
from hfbridge.serving import start_server

SRC = Path(__file__).resolve().parents[2] / "src" / "hfbridge"


class LoaderCalled(Exception):
    pass


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the model fails the test (raises :class:`LoaderCalled`)."""

    def loader(*args, **kwargs):
        raise LoaderCalled

    monkeypatch.setattr(served_models, "open_served_model", loader)
    monkeypatch.setattr("hfbridge.models.loading.load_for_inference", loader)
    monkeypatch.delenv("HFBRIDGE_API_KEY", raising=False)


def _serve(*flags) -> int:
    return cli.main(["serve", "--model", "tiny-model-folder", *flags])


def test_a_port_in_use_is_reported_before_loading(no_loading, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert _serve("--port", str(port)) == 2
    assert "the port is in use" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--port", "70000"], "out of range"),
    (["--port", "-1"], "out of range"),
    (["--host", "0.0.0.0"], "--api-key or the HFBRIDGE_API_KEY"),
    (["--host", "192.0.2.1", "--api-key", "k"], "no such address"),  # TEST-NET-1: on no machine
])
def test_bad_hosts_and_ports_exit_2_before_loading(no_loading, capsys, flags, message):
    assert _serve(*flags) == 2
    assert message in capsys.readouterr().err


def test_any_address_with_a_key_goes_on_to_load(no_loading, monkeypatch):
    monkeypatch.setenv("HFBRIDGE_API_KEY", "k")
    with pytest.raises(LoaderCalled):
        _serve("--host", "0.0.0.0", "--port", "0")


def _folders(tiny_model_dir, tmp_path) -> dict[str, Path]:
    """A model folder, an adapter folder, and finetune run folders holding each."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter-only"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    run = tmp_path / "run"
    run.mkdir()
    (run / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    adapter_run = tmp_path / "adapter-run"
    adapter_run.mkdir()
    (adapter_run / "adapter").symlink_to(adapter, target_is_directory=True)
    return {"model folder": Path(tiny_model_dir), "adapter folder": adapter, "finetune run (model/)": run,
            "finetune run (adapter/)": adapter_run}


def test_every_kind_of_model_folder_is_served(tiny_model_dir, tmp_path):
    answers = {}
    for kind, folder in _folders(tiny_model_dir, tmp_path).items():
        served = served_models.open_served_model(str(folder), device="cpu")
        with start_server(served) as server, client_for(server) as client:
            reply = client.completions.create(model=served.model_id, prompt="hello", max_tokens=4, temperature=0)
            answers[kind] = reply.choices[0].text
    assert answers["model folder"] == answers["finetune run (model/)"]
    assert answers["adapter folder"] == answers["finetune run (adapter/)"]  # a fresh LoRA changes nothing yet
    assert answers["adapter folder"] == answers["model folder"]


def test_model_ids_never_show_whole_paths(tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    assert served_models.default_model_id(str(tmp_path / "run" / "model")) == "run"
    assert served_models.default_model_id(str(tmp_path / "run")) == "run"
    assert served_models.default_model_id("smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_only_the_command_line_imports_the_server():
    """The server is a face: no core module (models, data, recipe, generation, ...) imports it."""
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        if module.startswith("hfbridge.serving") or module == "hfbridge.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("hfbridge.serving") for n in names), f"{module} imports {names}"


@pytest.mark.slow
def test_the_embedded_smollm2_answers_over_http():
    served = served_models.open_served_model("smollm2-135m-instruct", device="cpu")
    with start_server(served) as server, client_for(server) as client:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model=served.model_id, messages=messages, max_tokens=16,
                                               temperature=0)
        chunks = client.chat.completions.create(model=served.model_id, messages=messages, max_tokens=16,
                                                temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in reply.choices[0].message.content
    assert streamed == reply.choices[0].message.content
