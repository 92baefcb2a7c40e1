"""Checkpoints: a run never takes over another run's checkpoint folder, resumes only with the same config, data
and batch layout, verifies every file's checksum, and unpickles nothing but tensors and plain containers.

One process with ``--checkpoint-dir`` runs the sharded path on a process group of one, so these run in-process."""

import json
import pickle

import pytest
import torch

from hfbridge import cli
from hfbridge.data.demo import write_demo_data
from hfbridge.parallel import checkpoint as ckpt


@pytest.fixture
def run(tiny_model_dir, tmp_path):
    train, _ = write_demo_data(tmp_path / "data", n_train=16, n_test=2)

    def finetune(out: str, *extra: str) -> int:
        return cli.main(["finetune", "--model", str(tiny_model_dir), "--data", str(train), "--output",
                         str(tmp_path / out), "--batch-size", "4", "--max-steps", "2", "--no-progress-bar",
                         "--checkpoint-dir", str(tmp_path / "ck"), "--save-every", "1", *extra])
    return finetune


def test_another_run_is_refused_and_the_same_run_resumes(run, tmp_path, capsys):
    assert run("first") == 0
    steps = sorted(p.name for p in (tmp_path / "ck").glob("step-*"))
    assert steps and (tmp_path / "ck" / ckpt.RUN).is_file()
    assert run("second") == 2  # a fresh run in a folder holding the first run's checkpoints
    err = capsys.readouterr().err
    assert "holds checkpoints of an earlier run; pass --resume" in err and not (tmp_path / "second").exists()
    assert sorted(p.name for p in (tmp_path / "ck").glob("step-*")) == steps  # nothing deleted
    assert run("bigger", "--resume", "--batch-size", "8") == 2  # another global batch
    assert "global_batch: saved 4, now 8" in capsys.readouterr().err
    assert run("resumed", "--resume", "--max-steps", "3") == 0  # the same run, trained one step further
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["optimizer_steps"] == 3


def test_a_corrupted_or_truncated_file_is_refused_by_name(run, tmp_path, capsys):
    assert run("first") == 0
    step = ckpt.resolve_checkpoint(tmp_path / "ck")
    shard = next(p for p in step.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    shard.write_bytes(bytes(data))
    assert run("again", "--resume", "--max-steps", "3") == 2
    assert f"{shard.name} does not match its SHA-256" in capsys.readouterr().err
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(ckpt.CheckpointError, match="does not match its SHA-256"):
        ckpt.verify_checksums(step)


def test_a_pickled_object_in_the_trainer_state_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran while loading a checkpoint",))

    step = tmp_path / "step-00000001"
    step.mkdir()
    torch.save({"epoch": 0, "evil": Payload()}, step / ckpt.TRAINER_STATE)
    with pytest.raises(ckpt.CheckpointError, match="refuses to unpickle"):
        ckpt.load_trainer_state(step)
    torch.save({"epoch": 0, "loops": {"fit_loop": {"step": torch.tensor(3)}}}, step / ckpt.TRAINER_STATE)
    assert ckpt.load_trainer_state(step)["epoch"] == 0  # tensors and plain containers load
    assert pickle.UnpicklingError is not ckpt.CheckpointError


def test_random_states_are_saved_as_json_and_restored(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    saved = json.loads(json.dumps(ckpt._rng_state()))
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    ckpt._set_rng_state(saved)
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
