"""The logged ``train_loss`` is the optimizer step's loss over all data-parallel ranks (not rank 0's share), under
pure data parallelism and FSDP, with the data module and with a plain ``DataLoader`` (whose steps are normalised
after their last backward, over all ranks): equal to one process on the same global batch, and the first step's to
a hand-computed reference. One ``torchrun`` of 2 gloo processes runs the four jobs (3 steps of 2 micro-batches)."""

import pytest
import torch
from par_common import ACCUMULATE, GLOBAL_BATCH, fit, records, torchrun
from torch.utils.data import DistributedSampler
from transformers import AutoModelForCausalLM

from hfbridge import CausalLMDataModule, HFAutoModelForCausalLM, masked_cross_entropy
from hfbridge.data import EpochShuffleSampler

ATOL = 1e-5


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("logged-2")
    m = str(tiny_model_dir)
    jobs = {"dp=2": f"{m}|2,1,1,1|", "fsdp=2": f"{m}|1,2,1,1|",
            "dp=2, plain DataLoader": f"{m}|2,1,1,1|plain", "fsdp=2, plain DataLoader": f"{m}|1,2,1,1|plain"}
    torchrun(2, "logged", str(out), *jobs.values(), timeout=300)
    return {name: torch.load(out / f"logged-{job.replace('/', '_').replace('|', '+')}.pt") for name, job in jobs.items()}


def _first_step_loss(model_dir, samples: list[int]) -> float:
    """The per-token loss of the initial model over ``samples`` (indices into :func:`records`), as one padded batch."""
    dm = CausalLMDataModule(HFAutoModelForCausalLM.configure_tokenizer(str(model_dir)), records(), seed=1)
    dm.setup()
    batch = dm.collator([dm.train_samples[i] for i in samples])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(masked_cross_entropy(logits, batch["labels"]))


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    """One process, same global batch: the Recorder of a fit with the data module and with a plain DataLoader."""
    return {plain: fit(tiny_model_dir, plain_loader=plain)[0] for plain in (False, True)}


def test_logged_train_loss_is_the_global_step_loss_under_dp_and_fsdp(two_process_runs, references, tiny_model_dir):
    n, window = len(records()), GLOBAL_BATCH * ACCUMULATE
    plain_order = list(DistributedSampler(range(n), num_replicas=1, rank=0))  # Lightning's, seed 0
    for plain, order in ((False, list(EpochShuffleSampler(n, seed=1))), (True, plain_order)):
        reference = references[plain]
        # the first step's logged loss is the hand-computed mean over its whole global batch ...
        assert reference.logged[0] == pytest.approx(_first_step_loss(tiny_model_dir, order[:window]), abs=ATOL)
        # ... which rank 0's half of it (every other sample, as the ranks are sharded) is not: the test can fail
        assert abs(_first_step_loss(tiny_model_dir, order[:window:2]) - reference.logged[0]) > 100 * ATOL
    for name, run in two_process_runs.items():
        reference = references["plain" in name]
        assert len(run["logged"]) == len(reference.logged) == 3, name
        assert run["logged"] == pytest.approx(reference.logged, abs=ATOL), name


def test_plain_dataloader_gradients_on_two_processes_equal_one_process(two_process_runs, references):
    """A plain DataLoader's steps are normalised after their last backward by the label tokens of all ranks."""
    reference = references[True].grads
    for name in ("dp=2, plain DataLoader", "fsdp=2, plain DataLoader"):
        grads = two_process_runs[name]["grads"]
        assert grads.keys() == reference.keys(), name
        for param, grad in reference.items():
            assert torch.allclose(grads[param], grad, atol=ATOL, rtol=0), (name, param)
