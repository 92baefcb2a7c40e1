"""Bad data is reported with its file, line and what is allowed, before any weights load (exit status 2)."""

import io
import json

import pytest
from PIL import Image

from hfbridge import cli
from hfbridge.data.formats import DataFormatError, check_record
from hfbridge.data.image_text import ImageError, load_image_text_records
from hfbridge.data.sources import DataSourceError, read_records


def test_a_csv_cell_over_128_kib_reads(tmp_path):
    big = "x" * (300 * 1024)
    path = tmp_path / "long.csv"
    path.write_text(f"prompt,completion\nshort,\"{big}\"\n", encoding="utf-8")
    (_, record), = read_records(path)
    assert len(record["completion"]) == len(big)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffprompt,completion\na,b\n".encode())
    assert read_records(path)[0][1] == {"prompt": "a", "completion": "b"}
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes("\ufeff".encode() + json.dumps({"text": "hi"}).encode() + b"\n")
    assert read_records(jsonl)[0][1] == {"text": "hi"}


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, suffix):
    path = tmp_path / f"latin1.{suffix}"
    good = "prompt,completion\na,b\n" if suffix == "csv" else json.dumps({"text": "ok"}) + "\n"
    bad = "caf\xe9,x\n" if suffix == "csv" else '{"text": "caf\xe9"}\n'
    path.write_bytes(good.encode() + bad.encode("latin-1"))
    with pytest.raises(DataSourceError, match=rf"latin1\.{suffix}:\d+: not UTF-8 text .*re-save the file as UTF-8"):
        read_records(path)


@pytest.mark.parametrize(("message", "error"), [
    ({"role": "user", "content": ["a", "b"]}, r"messages\[0\]\.content: must be a string, got list"),
    ({"role": "user", "content": 5}, r"messages\[0\]\.content: must be a string, got int"),
    ({"role": "narrator", "content": "hi"}, r"messages\[0\]\.role is 'narrator'; allowed: system, developer"),
])
def test_chat_messages_are_checked(message, error):
    record = {"messages": [message, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(DataFormatError, match=error):
        check_record(record, "messages", "data.jsonl:3")


def _image_record(tmp_path, image_bytes: bytes) -> list[dict]:
    (tmp_path / "img.png").write_bytes(image_bytes)
    return [{"messages": [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "img.png")},
                                                        {"type": "text", "text": "colour?"}]},
                          {"role": "assistant", "content": "red"}]}]


def _png(size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_truncated_image_is_caught_when_the_records_are_read(tmp_path):
    data = _png()
    load_image_text_records(_image_record(tmp_path, data))  # the whole image is fine
    with pytest.raises(ImageError, match="img.png is truncated or corrupt"):
        load_image_text_records(_image_record(tmp_path, data[: len(data) * 2 // 3]))


def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 32x32 image stands for a huge one
    with pytest.raises(ImageError, match="larger than PIL's safety limit of 100 pixels"):
        load_image_text_records(_image_record(tmp_path, _png()))


def test_bad_data_fails_the_command_before_loading_with_status_2(tmp_path, capsys, monkeypatch):
    from hfbridge.models import loading

    monkeypatch.setattr(loading, "load_pretrained_model", lambda *a, **k: pytest.fail("weights were loaded"))
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]})
                    + "\n")
    assert cli.main(["finetune", "--data", str(path), "--output", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: messages[0].content: must be a string, got int" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_os_error_is_one_line(tmp_path, capsys, monkeypatch):
    """Disk full (or any OSError) while writing is reported in one line, status 2, and no output folder is left."""
    from hfbridge.data import demo

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo, "write_demo_data", full)
    assert cli.main(["finetune", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["hfbridge finetune: error: [Errno 28] No space left on device"]
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_a_missing_tokenizer_does_not_cost_the_trained_weights(tiny_model_dir, tmp_path, caplog):
    import shutil

    from hfbridge import HFAutoModelForCausalLM
    from hfbridge.io import OutputExistsError

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, bare / name)
    module = HFAutoModelForCausalLM(model_name=str(bare))
    module.configure_model()
    out = module.save_pretrained(tmp_path / "saved")
    assert (out / "model.safetensors").exists() and not (out / "tokenizer.json").exists()
    assert "saving the weights without a tokenizer" in caplog.text
    with pytest.raises(OutputExistsError):  # the library's saves refuse a non-empty folder unless told
        module.save_pretrained(tmp_path / "saved")
    module.save_pretrained(tmp_path / "saved", overwrite=True)


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
    (["--sample", "--temperature", "0"], "--temperature must be above 0 to sample"),
])
def test_generate_options_are_checked_before_loading(argv, message, capsys, monkeypatch):
    from hfbridge.models import loading

    monkeypatch.setattr(loading, "load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["generate", "--model", "x", "--prompt", "hi", *argv]) == 2
    assert message in capsys.readouterr().err
