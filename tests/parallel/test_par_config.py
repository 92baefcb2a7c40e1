"""Mesh sizes, plans, checks and checkpoint folders: everything that needs no process group (fast)."""

import pytest
import torch

from hfbridge import cli
from hfbridge.data.datamodule import CausalLMDataModule, EpochShuffleSampler
from hfbridge.parallel import ParallelConfig, plans, resolve_axis_dims
from hfbridge.parallel import checkpoint as ckpt
from hfbridge.parallel.launch import maybe_launch, torchrun_command
from hfbridge.parallel.mesh import MeshLayout, parse_axis_dims
from hfbridge.parallel.parallelize import UnsupportedParallelismError, check_supported
from hfbridge.testing import tiny_llama_config


def meta_model(family="llama", **overrides):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_llama_config(512, family, **overrides))


# ------------------------------------------------------------------------------------------------ mesh
def test_minus_one_is_inferred_from_the_world_size():
    assert resolve_axis_dims((1, -1, 1, 1), 8) == (1, 8, 1, 1)
    assert resolve_axis_dims((2, -1, 2, 1), 8) == (2, 2, 2, 1)
    assert ParallelConfig(sharding_axis_dims=(2, -1), sharding_axis_names=("tp", "fsdp")).axis_sizes(8) == {
        "dp": 1, "fsdp": 4, "tp": 2, "sp": 1, "cp": 1}


@pytest.mark.parametrize("dims, world, message", [
    ((1, 2, 2, 1), 2, "multiply to 4 but the world size is 2"),
    ((1, -1, 3, 1), 4, "do not divide the world size 4|does not divide the world size 4"),
    ((1, -1, -1, 1), 4, "at most one -1"),
    ((1, 0, 1, 1), 4, "positive int or -1"),
])
def test_mesh_sizes_that_do_not_match_the_world_are_clear_errors(dims, world, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(sharding_axis_dims=dims).axis_sizes(world)


@pytest.mark.parametrize("names, message", [
    (("dp", "fsdp", "tp", "xp"), "unknown axis 'xp'"),
    (("dp", "dp", "tp", "sp"), "repeat a name"),
    (("dp", "fsdp"), "differ in length"),
])
def test_bad_axis_names_are_errors(names, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(sharding_axis_dims=(1, -1, 1, 1), sharding_axis_names=names)


def test_command_line_mesh_option(tiny_model_dir, tmp_path, capsys):
    assert parse_axis_dims("1,-1,2,1") == (1, -1, 2, 1)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_axis_dims("1,x")
    from hfbridge.data.demo import write_demo_data

    train, _ = write_demo_data(tmp_path / "data", n_train=8, n_test=2)
    code = cli.main(["finetune", "--model", str(tiny_model_dir), "--data", str(train), "--output",
                     str(tmp_path / "out"), "--sharding-axis-dims", "1,2,2,1", "--no-progress-bar"])
    assert code == 2
    assert "multiply to 4 but the world size is 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ plans
def test_plan_comes_from_the_models_hf_tp_plan_or_the_built_in_one(monkeypatch):
    model = meta_model("qwen3")
    plan, source = plans.resolve_plan(model)
    assert source == "the model's tp_plan"
    assert plan["model.layers.1.self_attn.q_proj"] == "colwise"
    assert plan["model.layers.0.self_attn.k_norm"] == "replicated_with_grad_allreduce"
    assert plan["lm_head"] == "colwise_gather_output"
    monkeypatch.setattr(type(model), "tp_plan", None, raising=False)  # a model transformers gives no plan
    monkeypatch.setattr(model, "_tp_plan", None)
    plan2, source2 = plans.resolve_plan(model)
    assert source2 == "hfbridge's built-in qwen3 plan" and plan2 == plan


def test_partition_rules_first_match_wins_and_unmatched_parameters_are_named():
    model = meta_model()
    rules = [(r"(q|k|v|gate|up)_proj\.weight$", "colwise"), (r"proj\.weight$", "rowwise"),
             (r"lm_head", "colwise"), (r"embed_tokens", "rowwise"), (r"norm", "replicate")]
    plan = plans.plan_from_rules(model, rules)
    assert plan["model.layers.0.self_attn.q_proj"] == "colwise"  # matches both rules: the first wins
    assert plan["model.layers.0.self_attn.o_proj"] == "rowwise"
    assert plan["lm_head"] == "colwise_gather_output" and plan["model.embed_tokens"] == "embedding_rowwise"
    assert not any("norm" in name for name in plan)
    with pytest.raises(plans.UnmatchedParameterError, match=r"'model.norm.weight' matches no partition rule"):
        plans.plan_from_rules(model, rules[:-1] + [(r"layernorm", "replicate")])
    with pytest.raises(plans.PlanError, match="not supported"):
        plans.plan_from_rules(model, [(r".*", "diagonal")])


def test_model_without_a_plan_asks_for_partition_rules():
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2))
    if getattr(model, "tp_plan", None):
        pytest.skip("this transformers gives gpt2 a tp_plan")
    with pytest.raises(plans.PlanError, match="Pass partition rules"):
        plans.resolve_plan(model)
    with pytest.raises(plans.PlanError, match="sequence parallelism is implemented for"):
        plans.parallel_styles(model, {}, sequence_parallel=True)


@pytest.mark.parametrize("tp, attr", [(4, "num_key_value_heads"), (3, "num_attention_heads")])
def test_tp_that_does_not_divide_the_heads_is_a_clear_error(tp, attr):
    config = tiny_llama_config(512)  # 4 query heads, 2 key-value heads
    with pytest.raises(ValueError, match=f"must divide {attr}=.*choose tp\\*sp among \\[1, 2\\]"):
        plans.check_divisibility(config, tp)
    plans.check_divisibility(config, 2)


def _layout(tp, sp=1, fsdp=1):
    return MeshLayout(mesh=None, data=None, data_flat=None, model=object() if tp * sp > 1 else None,
                      sizes={"dp": 1, "fsdp": fsdp, "tp": tp, "sp": sp, "cp": 1})


def test_4bit_on_a_mesh_is_qlora_over_fsdp_only():
    """4-bit weights shard over fsdp/dp with an adapter (tests/parallel/test_par_sharded_paths.py trains it); with
    tensor parallelism, or without an adapter, they are refused with the reason."""

    model = meta_model()
    model.is_loaded_in_4bit = True
    with pytest.raises(UnsupportedParallelismError, match="tensor/sequence parallelism"):
        check_supported(model, _layout(2))
    with pytest.raises(UnsupportedParallelismError, match="trains an adapter"):
        check_supported(model, _layout(1, fsdp=2))


def test_adapters_with_sequence_parallel_are_refused_clearly():
    from hfbridge import LoRA

    model = LoRA(r=2, alpha=4, dropout=0.0)(meta_model())
    with pytest.raises(UnsupportedParallelismError, match="sequence parallelism"):
        check_supported(model, _layout(1, sp=2))
    check_supported(model, _layout(1))  # FSDP/dp with adapters is fine


# ------------------------------------------------------------------------------------------------ data
def test_data_is_sharded_by_the_data_parallel_coordinate(tiny_tokenizer, prompt_data):
    dm = CausalLMDataModule(tiny_tokenizer, prompt_data, batch_size=2)

    class Strategy:
        data_parallel_rank, data_parallel_size = 1, 2

    class Trainer:
        strategy, global_rank, world_size, accumulate_grad_batches = Strategy(), 3, 4, 1

    dm.trainer = Trainer()
    assert dm._dp_rank_and_size() == (1, 2)  # tensor-parallel peers of rank 3 share its batch


def test_sampler_resumes_after_the_samples_already_used():
    full = list(EpochShuffleSampler(10, seed=3, num_replicas=2, rank=1))
    sampler = EpochShuffleSampler(10, seed=3, num_replicas=2, rank=1)
    sampler.resume = (0, 2)
    assert list(sampler) == full[2:]
    assert list(sampler) == full  # only once
    sampler.set_epoch(1)
    sampler.resume = (0, 2)  # another epoch's position is ignored
    assert list(sampler) == list(EpochShuffleSampler(10, seed=4, num_replicas=2, rank=1))


# ------------------------------------------------------------------------------------------------ checkpoints
def _fake_checkpoint(root, step, complete=True, tmp=False):
    folder = root / (ckpt.step_dir_name(step) + (ckpt.TMP_SUFFIX if tmp else ""))
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_text("x")
    if complete:
        (folder / ckpt.COMPLETE).write_text("ok\n")
    return folder


def test_resume_skips_saves_that_were_cut_short(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    good = _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, complete=False, tmp=True)  # killed while writing
    _fake_checkpoint(tmp_path, 8, complete=False)  # renamed by hand, never completed
    ckpt.write_latest(tmp_path, ckpt.step_dir_name(8))
    assert ckpt.resolve_checkpoint(tmp_path) == good
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.resolve_checkpoint(tmp_path / ckpt.step_dir_name(8))
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint in .*ignored: step-00000006.tmp"):
        ckpt.resolve_checkpoint(_fake_checkpoint(tmp_path / "other", 6, complete=False, tmp=True).parent)


def test_keep_last_k_and_stale_tmp_folders_are_removed(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 5, complete=False, tmp=True)
    ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]


def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    saved = ckpt.model_fingerprint(meta_model("llama"))
    assert ckpt.model_fingerprint(meta_model("llama")) == saved
    with pytest.raises(ckpt.CheckpointMismatchError, match="saved from another model.*model_type.*qwen3"):
        ckpt.check_fingerprint(saved, ckpt.model_fingerprint(meta_model("qwen3")), tmp_path)


# ------------------------------------------------------------------------------------------------ launch
def test_torchrun_command(monkeypatch):
    cmd = torchrun_command(["finetune", "--data", "x.jsonl", "--nproc-per-node", "4"], 4)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone", "-m", "hfbridge",
                       "finetune", "--data", "x.jsonl", "--nproc-per-node", "4"]
    multi = torchrun_command(["finetune"], 8, nnodes="2", rdzv_endpoint="node0:29500", rdzv_id="job7")
    assert multi[3:13] == ["--nproc-per-node", "8", "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                           "node0:29500", "--rdzv-id", "job7"]
    with pytest.raises(ValueError, match="needs --rdzv-endpoint"):
        torchrun_command(["finetune"], 8, nnodes="2")
    args = cli.build_parser().parse_args(["finetune", "--nproc-per-node", "2"])
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert maybe_launch(cli.finetune_config(args).parallel, []) is None  # already under torchrun: run here
