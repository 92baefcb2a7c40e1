"""Sharded checkpoints: a run killed with ``kill -9`` (while it was writing a checkpoint) resumes, on another
layout, with the losses of a run that was never interrupted; another model's checkpoint is refused."""

import os
import signal
import subprocess
import sys
import time

import pytest
from par_common import HERE, WORKER, fit

from hfbridge.parallel import checkpoint as ckpt

STEPS = 8


def _start(args, log):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(WORKER), *args]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_workers(marker: str) -> None:
    """SIGKILL every process whose command line names ``marker`` (this run's own folder), and wait until gone."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        os.kill(int(entry), signal.SIGKILL)
                        pids.append(int(entry))
            except (OSError, ProcessLookupError):
                pass
    deadline = time.time() + 30
    while pids and time.time() < deadline:
        pids = [pid for pid in pids if os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid)]
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_killed_run_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path, tiny_model_dir, qwen3_tied_dir):
    ck, out = tmp_path / "ck", tmp_path / "out"
    out.mkdir()
    # 1. tensor parallel over 2 processes, a checkpoint every 2 steps; it hangs inside the save of step 6 and is
    #    killed there with SIGKILL (the whole process group: torchrun and both workers).
    log = open(tmp_path / "run.log", "w")
    proc = _start(["train", str(out), str(tiny_model_dir), "1,1,2,1", str(STEPS), str(ck), "2", "stall-save=6"], log)
    try:
        deadline = time.time() + 240
        while not (out / "stalled").exists():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-5000:]
            assert time.time() < deadline, "the run did not reach step 6"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        _kill_workers(str(out))  # torchrun starts its workers in sessions of their own: the kill above misses them
        proc.wait()
        log.close()
    assert (ck / "step-00000006.tmp").is_dir() and not (ck / "step-00000006").exists()
    assert (ck / ckpt.LATEST).read_text().strip() == "step-00000004"
    before_kill = [float(line.split()[1]) for line in (out / "losses.txt").read_text().splitlines()]
    assert len(before_kill) == 6

    # 2. resume with FSDP instead (checkpoints hold global tensors): from step 4, the cut-short save ignored.
    #    First with another model, which must be refused by name.
    from par_common import torchrun

    torchrun(2, "train", str(out), str(tiny_model_dir), "1,2,1,1", str(STEPS), str(ck), "2", "resume",
             f"wrong-model={qwen3_tied_dir}", timeout=300)
    assert "saved from another model" in (out / "mismatch.txt").read_text()
    resumed = [line.split() for line in (out / "losses-resumed.txt").read_text().splitlines()]
    assert [int(step) for step, _ in resumed] == [5, 6, 7, 8]

    # 3. one process, never interrupted
    reference = fit(tiny_model_dir, steps=STEPS)[0].losses
    assert before_kill == pytest.approx(reference[:6], abs=1e-5)
    assert [float(loss) for _, loss in resumed] == pytest.approx(reference[4:], abs=1e-5)
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-00000004", "step-00000006", "step-00000008"]
