"""The GPU benchmark's dry run (bench/gpu.sh --dry-run): the same code as the GPU run, end to end on CPU with a
tiny model, every system in its own process; and its checks of bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench_loader import load_bench

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    return load_bench("gpu_bench")


def _run(*args, timeout=600, **env_extra):
    env = {**os.environ, "HFBRIDGE_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **env_extra}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_trains_every_system_on_the_same_tokens(tmp_path):
    out_json, out_md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    proc = _run("--dry-run", "--json", out_json, "--markdown", out_md)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out_json.read_text())
    results = payload["results"]
    systems = {"hfbridge-full", "trl-full", "hfbridge-lora", "trl-lora"}
    assert set(results) == systems
    for name, r in results.items():
        assert "error" not in r, name
        assert r["tokens"] > 0 and r["seconds"] > 0, name
        assert len(r["losses"]) == payload["args"]["steps"] and all(math.isfinite(x) for x in r["losses"]), name
        assert r["dtype"] == "float32" and r["liger"] is False  # CPU: float32, no Liger (said in the report)
        assert payload["derived"]["systems"][name]["label_tokens_per_s"] > 0
    # hfbridge and TRL train the same rows: the same data, and the same label tokens in all and in the timed steps
    assert len({r["data_digest"] for r in results.values()}) == 1
    assert len({(r["tokens_all"], r["tokens"]) for r in results.values()}) == 1
    # the label tokens are those of the samples, counted independently of both systems: n - 1 per sample of n
    bench = _bench()
    args = bench.parse_args(["--dry-run"])[1]
    tokens, rows = bench.build_rows(args)
    assert results["trl-full"]["tokens_all"] == sum(len(tokens[i]) - 1 for row in rows for i in row)
    # same model, same tokens, same normalisation: both systems' first-step losses agree (fp32), and so do the
    # full fine-tuning runs' last ones (the same optimizer and schedule)
    for mode in ("full", "lora"):
        ours, theirs = results[f"hfbridge-{mode}"]["losses"], results[f"trl-{mode}"]["losses"]
        assert ours[0] == pytest.approx(theirs[0], rel=1e-5)
    assert results["hfbridge-full"]["loss"] == pytest.approx(results["trl-full"]["loss"], rel=1e-4)
    assert all(payload["derived"]["checks"].values())
    table = out_md.read_text()
    assert table == payload["report"] and "Dry run" in table and "float32" in table and "Projection" in table
    for name in systems:
        assert f"| {name} (" in table and name in proc.stdout


def test_bad_input_is_refused_before_any_model_is_built(tmp_path):
    existing = tmp_path / "taken.json"
    existing.write_text("mine")
    proc = _run("--dry-run", "--json", existing, "--markdown", tmp_path / "taken.md", timeout=60)
    assert proc.returncode == 2 and "--json" in proc.stderr and "exists" in proc.stderr
    assert existing.read_text() == "mine"
    proc = _run("--dry-run", "--systems", "hfbridge-full,vllm", "--json", tmp_path / "a.json",
                "--markdown", tmp_path / "a.md", timeout=60)
    assert proc.returncode == 2 and "unknown vllm" in proc.stderr
    proc = _run("--dry-run", "--warmup", "3", "--steps", "3", "--json", tmp_path / "b.json",
                "--markdown", tmp_path / "b.md", timeout=60)
    assert proc.returncode == 2 and "--warmup" in proc.stderr
    assert not any(tmp_path.glob("[ab].json")) and not any(tmp_path.glob("*.md"))


@pytest.mark.parametrize("driver_cuda, build", [("13.0", "cu130"), ("12.8", "cu128")])
def test_gpu_sh_picks_the_cuda_build_from_the_driver(tmp_path, driver_cuda, build):
    """Without --dry-run the script installs; here a stand-in nvidia-smi reports the driver, and a Python that
    cannot make a venv stops it right after it has said what it installs (nothing is downloaded)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    banner = f"| Driver Version: 580.65   CUDA Version: {driver_cuda}  |"
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\necho '{banner}'\n")
    (fake / "nvidia-smi").chmod(0o755)
    venv = tmp_path / "venv"
    proc = _run("--json", tmp_path / "r.json", timeout=60, PATH=f"{fake}:{os.environ['PATH']}", PYTHON="false",
                HFBRIDGE_GPU_VENV=str(venv))
    assert proc.returncode == 2 and "-m venv' failed" in proc.stderr
    assert f"torch 2.13.0+{build} (driver: CUDA {driver_cuda})" in proc.stdout
    proc = _run("--json", tmp_path / "r.json", timeout=60, PATH=f"{fake}:{os.environ['PATH']}", TORCH_CUDA="rocm6",
                HFBRIDGE_GPU_VENV=str(venv))
    assert proc.returncode == 2 and "TORCH_CUDA=rocm6" in proc.stderr
    assert not venv.exists() and not (tmp_path / "r.json").exists()


def test_the_lock_filter_drops_only_the_cpu_torch_pin(tmp_path):
    """The awk line of bench/gpu.sh on requirements.lock: every requirement but torch's +cpu one, hashes kept."""
    script = (ROOT / "bench" / "gpu.sh").read_text()
    line = next(x for x in script.splitlines() if x.strip().startswith("awk "))
    program = line.split("'")[1]
    out = subprocess.run(["awk", program, str(ROOT / "requirements.lock")], capture_output=True, text=True,
                         check=True)
    lock = (ROOT / "requirements.lock").read_text()

    def requirements(text):
        return [x.split()[0] for x in text.splitlines() if x and not x[0].isspace() and not x.startswith("#")]

    before, after = requirements(lock), requirements(out.stdout)
    assert [r for r in before if "+cpu" in r] == ["torch==2.13.0+cpu"]
    assert after == [r for r in before if r != "torch==2.13.0+cpu"]
    # every hash is kept but those listed under torch's entry (up to the next requirement)
    lines = lock.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("torch=="))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace())
    torch_hashes = {x.split("--hash=")[1].split()[0] for x in lines[start:end] if "--hash=" in x}
    all_hashes = {x.split("--hash=")[1].split()[0] for x in lines if "--hash=" in x}
    kept = {x.split("--hash=")[1].split()[0] for x in out.stdout.splitlines() if "--hash=" in x}
    assert torch_hashes and kept == all_hashes - torch_hashes


def test_flops_and_peak_lookup():
    bench = _bench()
    # Llama-3.2-1B: 1.236B parameters in matrix products (the tied head included, the embedding lookup not)
    per_layer = 2 * 2048**2 + 2 * 2048 * 512 + 3 * 2048 * 8192  # q, o; k, v (8 of 32 heads); gate, up, down
    assert bench.matmul_params(bench.SHAPES["1b"]) == 16 * per_layer + 128256 * 2048
    assert bench.flops_per_token(bench.SHAPES["1b"], "full", 0) == 6 * bench.matmul_params(bench.SHAPES["1b"])
    # causal attention of one sample of n tokens: 2 x 2 x hidden x (1 + ... + n) per layer forward, x3 in all
    n, shape = 10, bench.SHAPES["tiny"]
    attention = 3 * 4 * shape["hidden_size"] * sum(range(1, n + 1)) * shape["num_hidden_layers"] / n
    lora_attention = bench.flops_per_token(shape, "lora", n) - 4 * bench.matmul_params(shape)
    assert lora_attention == pytest.approx(attention, rel=0.1)
    assert bench.peak_flops(None, "NVIDIA H100 80GB HBM3")[0] == 989e12
    assert bench.peak_flops(None, "NVIDIA H100 PCIe")[0] == 756e12
    assert bench.peak_flops(None, "NVIDIA H200")[0] == 989e12
    assert bench.peak_flops(None, "NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert bench.peak_flops(None, "NVIDIA L40S")[0] == 362e12
