"""Fault injection: a run killed (SIGKILL) at each phase of a checkpoint save resumes to the weights of a run
that was never interrupted; a disk that fills during a save leaves the old output intact with a clear error."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hfbridge.data.demo import write_demo_data
from hfbridge.io import atomic_dir

STEP = "step-00000004"
# Where the save of step 4 is killed: (function of hfbridge.parallel.checkpoint, the condition on its arguments
# that marks step 4's save, and whether the kill comes before or after the call).
KILL_AT = {
    # every rank wrote its shards, not yet the random and trainer states
    "shards-written": ("_rng_state", "(ck / (STEP + '.tmp')).exists()", "before"),
    # the checksums written, not yet COMPLETE
    "checksummed": ("write_checksums", "str(args[0]).endswith(STEP + '.tmp')", "after"),
    # complete and renamed to step-N, before `latest` points at it
    "renamed": ("write_latest", "args[1] == STEP", "before"),
}


def _finetune(model_dir, train, tmp_path, out, kill_at=None, resume=False, extra=()):
    ck = tmp_path / f"ck-{out.split('-')[0]}"
    args = ["finetune", "--model", str(model_dir), "--data", str(train), "--output", str(tmp_path / out), "--full",
            "--batch-size", "4", "--max-steps", "4", "--lr", "1e-3", "--no-progress-bar", "--save-every", "2",
            "--checkpoint-dir", str(ck), *(["--resume"] if resume else []), *extra]
    patch = ""
    if kill_at:
        name, condition, when = KILL_AT[kill_at]
        patch = textwrap.dedent(f"""
            import os, signal
            from pathlib import Path
            from hfbridge.parallel import checkpoint as ckpt
            ck, STEP, original = Path({str(ck)!r}), {STEP!r}, ckpt.{name}
            def killer(*args, **kwargs):
                hit = {condition}
                if hit and {when!r} == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                result = original(*args, **kwargs)
                if hit:
                    os.kill(os.getpid(), signal.SIGKILL)
                return result
            ckpt.{name} = killer
        """)
    script = patch + f"\nimport sys\nfrom hfbridge import cli\nsys.exit(cli.main({args!r}))\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def _weights(folder):
    return load_file(folder / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    train, _ = write_demo_data(tmp / "data", n_train=16, n_test=2)
    run = _finetune(tiny_model_dir, train, tmp, "ref")
    assert run.returncode == 0, run.stderr[-3000:]
    return train, _weights(tmp / "ref")


@pytest.mark.parametrize("phase", list(KILL_AT))
def test_a_kill_at_each_phase_of_a_save_resumes_to_the_uninterrupted_weights(phase, tiny_model_dir, tmp_path,
                                                                              reference):
    train, expected = reference
    name = f"{phase}-run"
    killed = _finetune(tiny_model_dir, train, tmp_path, name, kill_at=phase)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / name).exists()  # no half-written output folder
    resumed = _finetune(tiny_model_dir, train, tmp_path, f"{phase}-resumed", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _weights(tmp_path / f"{phase}-resumed")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)


def test_full_dpo_with_a_precomputed_reference_resumes_to_the_uninterrupted_weights(tiny_model_dir, tmp_path):
    """The precomputed reference of a full fine-tune is the model as loaded: a resumed run computes it again before
    the checkpoint's weights are restored, so killed during the save of step 4 and resumed from step 2, it ends
    where the uninterrupted run ends (with the trained weights as its reference it would not)."""
    from hfbridge.data.demo_preference import write_preference_data

    train, _ = write_preference_data(tmp_path / "data", n_train=16, seed=0, fmt="preference")
    dpo = ("--method", "dpo", "--reference", "precomputed", "--packing", "off", "--eval-samples", "2")
    ref = _finetune(tiny_model_dir, train, tmp_path, "ref", extra=dpo)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _finetune(tiny_model_dir, train, tmp_path, "dpo-run", kill_at="shards-written", extra=dpo)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _finetune(tiny_model_dir, train, tmp_path, "dpo-resumed", resume=True, extra=dpo)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-00000002" in resumed.stderr
    expected, got = _weights(tmp_path / "ref"), _weights(tmp_path / "dpo-resumed")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)


def test_a_full_disk_during_a_save_keeps_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"old weights")
    with pytest.raises(OSError, match="No space left"), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "weights.bin").write_bytes(b"half of the new")
        raise OSError(28, "No space left on device")
    assert (out / "weights.bin").read_bytes() == b"old weights" and not list(tmp_path.glob(".model.*"))
