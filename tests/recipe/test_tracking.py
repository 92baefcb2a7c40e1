"""Experiment trackers and per-step metrics: a real tiny run writes TensorBoard, W&B (offline) and MLflow (file
store) inside its run folder; after the run (and the rename of its temporary folder) each is read back with its own
reader and agrees with ``metrics.csv``; the per-step metrics are checked against hand computations (token counts
of the tokenized records, the gradient norm before clipping, sharded gradients over two processes); bad logger names
and missing tracker libraries fail while the config is read; the loss plot shows validation and extra metrics."""

from __future__ import annotations

import json
import socket
import struct
import zlib
from pathlib import Path

import pytest
import torch

from hfbridge import cli
from hfbridge.data.demo import write_demo_data
from hfbridge.reporting import plot_loss_curve, read_metrics

STEP_KEYS = ("train_loss", "lr", "grad_norm", "tokens_per_s", "label_tokens_per_s", "step_time_s", "peak_rss_mb")
REL = 1e-6  # values pass through float32 in every tracker


# --------------------------------------------------------------------------------------------------- readers
def wandb_records(path: Path) -> list:
    """The records of a W&B ``.wandb`` file: a LevelDB-style log (a 7-byte ``:W&B`` header, 32 KiB blocks of
    checksummed chunks) of ``wandb_internal_pb2.Record`` protobufs; every chunk's CRC-32 is checked."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, pending, payloads = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (crc, length, kind) == (0, 0, 0):
            pos += block - pos % block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record, or the last chunk of one
            payloads.append(pending)
            pending = b""
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def csv_series(out: Path) -> dict[str, dict[int, float]]:
    return {key: dict(points) for key, points in read_metrics(out / "metrics.csv").items()}


def assert_same(series: dict[int, float], reference: dict[int, float], what: str) -> None:
    assert sorted(series) == sorted(reference), what
    for step, value in reference.items():
        assert series[step] == pytest.approx(value, rel=REL), (what, step)


# --------------------------------------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    """16 records, micro-batches of 4, 2 accumulated: 2 optimizer steps an epoch, 2 epochs; validation every step;
    clipping at 0.05 (below the gradient norm of a fresh LoRA); all three trackers."""
    tmp = tmp_path_factory.mktemp("tracked")
    train, val = write_demo_data(tmp / "data", n_train=16, n_test=4)
    out = tmp / "run"
    assert cli.main(["finetune", "--no-progress-bar", "--model", str(tiny_model_dir), "--data", str(train),
                     "--val-data", str(val), "--output", str(out), "--batch-size", "4", "--accumulate", "2",
                     "--epochs", "2", "--validate-every", "1", "--max-grad-norm", "0.05", "--lr", "1e-3",
                     "--eval-samples", "1", "--max-new-tokens", "2", "--show-samples", "0",
                     "--logger", "tensorboard,wandb", "--logger", "mlflow", "--run-name", "tiny"]) == 0
    assert not list(tmp.glob(".run.tmp-*"))  # renamed: everything below is read after the run ended
    return out, train


def test_metrics_csv_has_every_step_metric(tracked_run):
    out, _ = tracked_run
    series = csv_series(out)
    for key in STEP_KEYS:
        assert sorted(series[key]) == [0, 1, 2, 3], key
    assert sorted(series["val_loss"]) == [0, 1, 2, 3]
    assert all(v > 0.05 for v in series["grad_norm"].values())  # before clipping at 0.05
    assert all(v > 0 for key in STEP_KEYS[3:] for v in series[key].values())


def test_token_counts_are_the_tokenized_records(tracked_run, tiny_model_dir):
    """Per step, tokens/s times the step's seconds is a whole number of tokens; over an epoch (2 steps) they add up
    to the tokens and label tokens of the 16 tokenized training records, counted here from the records."""
    from hfbridge.data.datamodule import CausalLMDataModule, load_records
    from hfbridge.models.causal_lm import HFAutoModelForCausalLM

    out, train = tracked_run
    series = csv_series(out)
    records, fmt = load_records(train, "auto")
    dm = CausalLMDataModule(HFAutoModelForCausalLM.configure_tokenizer(str(tiny_model_dir)), records,
                            data_format=fmt, max_length=256, batch_size=4)
    dm.setup()
    tokens = sum(len(s.input_ids) for s in dm.train_samples)
    labels = sum(sum(t != -100 for t in s.labels) for s in dm.train_samples)
    assert 0 < labels < tokens
    per_step = {key: [series[f"{key}_per_s"][s] * series["step_time_s"][s] for s in range(4)]
                for key in ("tokens", "label_tokens")}
    for values in per_step.values():
        assert all(abs(v - round(v)) < 1e-3 * v for v in values)
    for epoch in (0, 1):
        assert round(sum(per_step["tokens"][2 * epoch:2 * epoch + 2])) == tokens
        assert round(sum(per_step["label_tokens"][2 * epoch:2 * epoch + 2])) == labels


def test_tensorboard_events_equal_metrics_csv(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = tracked_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key, reference in csv_series(out).items():
        assert_same({e.step: e.value for e in events.Scalars(key)}, reference, key)
    hparams = (out / "tensorboard" / "hparams.yaml").read_text()
    assert "max_grad_norm: 0.05" in hparams and "loggers:" in hparams


def test_mlflow_file_store_equals_metrics_csv_and_its_paths_are_the_final_folder(tracked_run, monkeypatch):
    from mlflow import MlflowClient

    out, _ = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("hfbridge")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    for key, reference in csv_series(out).items():
        assert_same({m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}, reference, key)
    params = run.data.params
    assert params["optim/max_grad_norm"] == "0.05" and params["train/accumulate"] == "2"
    assert params["track/loggers"] == str(["tensorboard", "wandb", "mlflow"])
    # its artifact locations name the final folder, not the temporary one: an artifact logged now lands there
    final = out.resolve().as_uri()
    assert experiment.artifact_location.startswith(final) and run.info.artifact_uri.startswith(final)
    note = out.parent / "note.txt"
    note.write_text("after the run")
    client.log_artifact(run.info.run_id, str(note))
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    assert (out / "mlruns" / experiment.experiment_id / run.info.run_id / "artifacts" / "note.txt").is_file()


def test_wandb_offline_run_equals_metrics_csv(tracked_run):
    out, _ = tracked_run
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert (out / "wandb" / "latest-run").resolve() == run_dir.resolve()  # relative links survive the rename
    records = wandb_records(next(run_dir.glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds  # finished before the folder was renamed
    (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (header.project, header.display_name) == ("hfbridge", "tiny")
    logged: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in r.history.item}
            for key, value in row.items():
                if not key.startswith("_") and key not in ("trainer/global_step", "epoch"):
                    logged.setdefault(key, {})[row["trainer/global_step"]] = value
    reference = csv_series(out)
    assert set(logged) == set(reference)
    for key in reference:
        assert_same(logged[key], reference[key], key)
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in r.config.update})
    assert config["optim"]["max_grad_norm"] == 0.05
    assert config["track"]["loggers"] == ["tensorboard", "wandb", "mlflow"]


# --------------------------------------------------------------------------------------------------- the callback
class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)


def _lightning_module(own_counts: bool):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _Linear()

        def training_step(self, batch, batch_idx):
            return (self.net.layer(batch["x"]) * 10).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    if own_counts:
        Module.batch_token_counts = lambda self, batch: (batch["x"].shape[0] * 5, int(batch["chosen"].sum()))
    return Module()


def test_step_metrics_grad_norm_before_clipping_and_the_modules_own_token_counts(tmp_path):
    """A module with ``batch_token_counts`` (batches without input_ids): its counts, summed over the 2 micro-batches
    of each step; ``grad_norm`` equals the norm computed here from the gradients before clipping."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from hfbridge.tracking import StepMetrics

    class Reference(pl.Callback):  # runs after StepMetrics, before Lightning clips
        def __init__(self):
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad.flatten() for p in pl_module.parameters()]
            self.norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))

    batches = [{"x": torch.randn(2 + i % 2, 3), "chosen": torch.tensor([i, 1])} for i in range(4)]
    reference = Reference()
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=1e-3, accelerator="cpu",
                         logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1,
                         callbacks=[StepMetrics(), reference], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_lightning_module(own_counts=True), torch.utils.data.DataLoader(batches, batch_size=None))
    series = {key: dict(points) for key, points in read_metrics(tmp_path / "metrics.csv").items()}
    assert series["grad_norm"] == pytest.approx(dict(enumerate(reference.norms)), rel=REL)
    assert min(reference.norms) > 1e-3  # so the logged norm is the one before clipping
    for step, (first, second) in enumerate(zip(batches[::2], batches[1::2])):
        seconds = series["step_time_s"][step]
        tokens = 5 * (len(first["x"]) + len(second["x"]))
        labels = int(first["chosen"].sum() + second["chosen"].sum())
        assert series["tokens_per_s"][step] * seconds == pytest.approx(tokens, rel=1e-5)
        assert series["label_tokens_per_s"][step] * seconds == pytest.approx(labels, rel=1e-5)


def test_batch_token_counts_of_padded_and_packed_batches():
    """The samples' tokens and label tokens, whether the collators pad rows or pack them (several rows, each
    padded to the batch's width; the pad id is also EOS, which ends every sample)."""
    from hfbridge.data.collators import PaddedCollator
    from hfbridge.data.formats import TokenizedSample
    from hfbridge.data.packing import PackedCollator
    from hfbridge.tracking import batch_token_counts

    eos = 2
    lengths = [7, 3, 9, 2, 5, 6]
    samples = [TokenizedSample([5 + (i + j) % 4 for j in range(n - 1)] + [eos],
                               [-100] * (n // 2) + [5] * (n - n // 2 - 1) + [-100]) for i, n in enumerate(lengths)]
    tokens, labels = sum(lengths), sum(s.num_label_tokens for s in samples)
    plain = object()
    for collator in (PaddedCollator(eos), PaddedCollator(eos, pad_to_multiple_of=8), PackedCollator(eos, 12),
                     PackedCollator(eos, 12, pad_to_multiple_of=16), PackedCollator(eos, one_row=True),
                     PackedCollator(eos, 12, sequence_ids=True)):
        batch = collator(samples)
        assert batch["input_ids"].numel() > tokens or isinstance(collator, PackedCollator) and collator.one_row
        assert [int(v) for v in batch_token_counts(plain, batch)] == [tokens, labels], collator
    assert batch_token_counts(plain, [torch.ones(2)]) is None


# --------------------------------------------------------------------------------------------------- two processes
def _sharded_worker(rank: int, port: int, out: str) -> None:
    """FSDP2 on one layer and tensor parallelism on another (two meshes over the same 2 ranks), gloo: the norm of
    the sharded gradients, and the token sums of StepMetrics over data-parallel ranks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from hfbridge.tracking import StepMetrics, total_grad_norm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 8))
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 8))
    model.load_state_dict(reference.state_dict())
    x = torch.randn(5, 4)
    reference(x).pow(2).sum().backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in reference.parameters()]))
    parallelize_module(model[1], init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)), ColwiseParallel())
    fully_shard(model[0], mesh=init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",)))
    model(x).pow(2).sum().backward()
    shards = [type(p.grad).__name__ for p in model.parameters()]
    norm = float(total_grad_norm(model.parameters()))

    class Strategy:
        data_parallel_size = 1

    class Trainer:
        world_size = 2
        strategy = Strategy()

    class Module:
        device = torch.device("cpu")

    tp = StepMetrics._reduce(Trainer(), Module(), 10.0, 4.0, 100.0 + rank)  # one batch shared by the 2 ranks
    Strategy.data_parallel_size = 2
    dp = StepMetrics._reduce(Trainer(), Module(), 10.0 * (rank + 1), 4.0 * (rank + 1), 100.0 + rank)
    if rank == 0:
        Path(out).write_text(json.dumps({"norm": norm, "expected": float(expected), "shards": shards,
                                         "tp": tp, "dp": dp}))
    dist.destroy_process_group()


def test_grad_norm_of_sharded_gradients_and_token_sums_over_two_processes(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.json"
    mp.start_processes(_sharded_worker, args=(port, str(out)), nprocs=2, start_method="fork")
    result = json.loads(out.read_text())
    assert set(result["shards"]) == {"DTensor"}  # every gradient sharded, on two different meshes
    assert result["norm"] == pytest.approx(result["expected"], rel=1e-5)
    assert result["tp"] == [10.0, 4.0, 101.0]  # tensor-parallel ranks share their batch: counted once
    assert result["dp"] == [30.0, 12.0, 101.0]  # data-parallel ranks: summed; memory: the largest


# --------------------------------------------------------------------------------------------------- bad input
def test_unknown_logger_and_missing_tracker_library_fail_while_the_config_is_read(monkeypatch, capsys):
    import importlib.util

    from hfbridge.recipe.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match="unknown logger 'comet'; known: csv, tensorboard, wandb, mlflow"):
        resolve_config(None, {"track": {"loggers": ["tensorboard", "comet"]}})
    assert cli.main(["finetune", "--logger", "tensorbored", "--print-config"]) == 2
    assert "track.loggers: unknown logger 'tensorbored'" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r'wandb needs wandb, which is not installed.*pip install "hfbridge\[track\]"'):
        resolve_config(None, {"track": {"loggers": "mlflow,wandb"}})


def test_logger_flags_repeat_and_comma_separate(capsys):
    import yaml

    def loggers(*argv):
        assert cli.main(["finetune", "--print-config", *argv]) == 0
        return yaml.safe_load(capsys.readouterr().out)["track"]["loggers"]

    assert loggers() == []
    assert loggers("--logger", "tensorboard,wandb", "--logger", "mlflow") == ["tensorboard", "wandb", "mlflow"]
    assert loggers("--logger", "csv") == ["csv"]
    assert loggers("--set", "track.loggers=tensorboard") == ["tensorboard"]


# --------------------------------------------------------------------------------------------------- the plot
def _plotted(monkeypatch, *args, **kwargs) -> list[dict[str, list]]:
    """The lines of each panel of the loss plot, as drawn."""
    from matplotlib.figure import Figure

    panels: list[dict[str, list]] = []
    real = Figure.savefig

    def capture(fig, *a, **k):
        for ax in fig.axes:
            panels.append({line.get_label(): list(zip(*line.get_data())) for line in ax.get_lines()})
        return real(fig, *a, **k)

    monkeypatch.setattr(Figure, "savefig", capture)
    assert plot_loss_curve(*args, **kwargs).is_file()
    return panels


def test_loss_plot_shows_validation_and_extra_metrics(tmp_path, monkeypatch, tracked_run):
    # step-wise validation, from the real run: one validation point beside every step's training loss
    out, _ = tracked_run
    (loss,) = _plotted(monkeypatch, out / "metrics.csv", tmp_path / "a.png", extra_metrics=["rewards/margins"])
    series = csv_series(out)
    assert loss == {"train loss": sorted(series["train_loss"].items()), "val loss": sorted(series["val_loss"].items())}
    # epoch-wise validation (rows as Lightning's CSV logger writes them) and extra metrics in a second panel
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,rewards/accuracies,rewards/margins,step,train_loss,val_loss\n"
                   "0,0.5,0.1,0,2.0,\n0,0.75,0.3,1,1.5,\n0,,,1,,1.6\n1,1.0,0.7,2,1.0,\n1,1.0,0.9,3,0.8,\n1,,,3,,0.9\n")
    loss, extra = _plotted(monkeypatch, csv, tmp_path / "b.png", title="dpo",
                           extra_metrics=["rewards/accuracies", "rewards/margins", "rewards/absent"])
    assert loss["val loss"] == [(1, 1.6), (3, 0.9)] and len(loss["train loss"]) == 4
    assert extra == {"rewards/accuracies": [(0, 0.5), (1, 0.75), (2, 1.0), (3, 1.0)],
                     "rewards/margins": [(0, 0.1), (1, 0.3), (2, 0.7), (3, 0.9)]}
    assert len(_plotted(monkeypatch, csv, tmp_path / "c.png")) == 1  # the existing call: one panel
