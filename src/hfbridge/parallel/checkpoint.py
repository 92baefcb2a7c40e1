"""Sharded checkpoints that are complete or ignored, and consolidated export to Hugging Face safetensors.

A checkpoint folder holds one sub-folder per saved step::

    ckpts/
      run.json              the run these checkpoints belong to: config, data and batch layout (hashes)
      step-00000010/        complete: DCP shards, trainer_state.pt, hfbridge.json, rng/*.json, SHA256SUMS,
                            COMPLETE
      step-00000020/
      step-00000030.tmp/    a save cut short (kill -9): ignored, removed by the next save
      latest                "step-00000020": written after the folder is complete

Every rank writes its shards of the model and optimizer (``torch.distributed.checkpoint``) into
``step-N.tmp``; rank 0 then writes the trainer state (LR schedulers, loop progress, step), the data position and
the model's fingerprint, then ``COMPLETE``, renames the folder to ``step-N`` and points ``latest`` at it. Resuming
takes the newest folder with ``COMPLETE``, so a save that was killed half way is never read. The last ``K``
complete checkpoints are kept.

Checkpoints are layout-free (DCP stores global tensor coordinates): a run sharded one way can resume another way,
and :func:`hfbridge.parallel.export.export_hf` consolidates any of them, in one process, into a folder plain
transformers loads.

What is trusted: nothing in a checkpoint is unpickled as arbitrary Python. Random states are JSON; the trainer
state loads with ``torch.load(weights_only=True)`` (tensors and plain containers only: a pickled object is refused);
every file's SHA-256 is checked against ``SHA256SUMS`` before anything is read. DCP's own ``.metadata`` file is a
pickle written by ``torch.distributed.checkpoint``: it is covered by the checksum (a changed file is refused), but,
as with any DCP checkpoint, only resume from checkpoint folders you or your own runs wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from hfbridge.io import fsync_tree

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
META = "hfbridge.json"
TRAINER_STATE = "trainer_state.pt"
CHECKSUMS = "SHA256SUMS"
RUN = "run.json"
TMP_SUFFIX = ".tmp"
FORMAT_VERSION = 2
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected, or one that is not this run's or not intact."""


class CheckpointMismatchError(ValueError):
    """A checkpoint saved from another model than the one being resumed."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: ``path`` itself if it is a complete step folder, else the newest complete
    step folder under it (``latest`` is a hint; a newer complete folder wins, an incomplete one is skipped)."""
    path = Path(path)
    if _STEP_RE.match(path.name) or path.name.endswith(TMP_SUFFIX):
        if is_complete(path):
            return path
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker: its save was cut short)")
    complete = complete_checkpoints(path)
    if not complete:
        partial = sorted(p.name for p in path.glob("step-*")) if path.is_dir() else []
        detail = f" (incomplete, ignored: {', '.join(partial)})" if partial else ""
        raise CheckpointError(f"no complete checkpoint in {path}{detail}")
    newest = complete[-1][1]
    pointer = path / LATEST
    if pointer.is_file():
        named = path / pointer.read_text().strip()
        if named != newest:
            log.warning("%s names %s, but %s is the newest complete checkpoint; using it", pointer, named.name,
                        newest.name)
    skipped = [p.name for p in path.glob(f"step-*{TMP_SUFFIX}")] + [
        p.name for p in path.glob("step-*") if p.is_dir() and _STEP_RE.match(p.name) and not is_complete(p)
    ]
    if skipped:
        log.warning("ignoring incomplete checkpoints (saves cut short): %s", ", ".join(sorted(skipped)))
    return newest


def write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def prune(root: str | Path, keep_last: int | None) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete checkpoints (and stale ``.tmp`` folders)."""
    root = Path(root)
    removed = []
    for stale in root.glob(f"step-*{TMP_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    if keep_last is not None and keep_last > 0:
        for _, folder in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


# ------------------------------------------------------------------------------------------------ fingerprints
def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What identifies a model for resuming: its class, ``model_type`` and every parameter's name and global
    shape (a hash), plus a few readable config fields for the error message."""
    config = getattr(model, "config", None)
    shapes = sorted((name, tuple(p.shape)) for name, p in model.named_parameters())
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
    described = {}
    for attr in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = getattr(config, attr, None) if config is not None else None
        if value is not None:
            described[attr] = value
    cls = type(model)
    if cls.__name__.startswith("FSDP") and len(cls.__bases__) > 1:  # FSDP2's wrapper class: name the model's
        cls = cls.__bases__[-1]
    return {"class": cls.__name__, "parameters": len(shapes), "shapes_sha256": digest, "config": described}


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    if saved.get("shapes_sha256") == current.get("shapes_sha256"):
        return
    raise CheckpointMismatchError(
        f"checkpoint {where} was saved from another model: it holds {saved.get('class')} "
        f"{saved.get('config')} with {saved.get('parameters')} parameter tensors, but this run's model is "
        f"{current.get('class')} {current.get('config')} with {current.get('parameters')}. Resume with the model "
        "it was saved from, or start a new checkpoint folder"
    )


# ------------------------------------------------------------------------------------------------ rng
def _rng_state() -> dict[str, Any]:
    """This process's random states as JSON-able values (no pickle)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ------------------------------------------------------------------------------------------------ checksums
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """``SHA256SUMS``: the SHA-256 of every file in a step folder."""
    sums = {str(f.relative_to(folder)): _sha256(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name not in (CHECKSUMS, COMPLETE)}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1) + "\n")


def verify_checksums(folder: Path) -> None:
    """Every file of a step folder against ``SHA256SUMS``: a changed, missing or added file is an error."""
    listed = folder / CHECKSUMS
    if not listed.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {CHECKSUMS}: written by an older hfbridge or not by "
                              "hfbridge; it is not read")
    sums = json.loads(listed.read_text())
    present = {str(f.relative_to(folder)) for f in folder.rglob("*")
               if f.is_file() and f.name not in (CHECKSUMS, COMPLETE)}
    for name in sorted(present | set(sums)):
        if name not in sums:
            raise CheckpointError(f"checkpoint {folder}: {name} is not in {CHECKSUMS} (the folder was changed)")
        if name not in present:
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        if _sha256(folder / name) != sums[name]:
            raise CheckpointError(f"checkpoint {folder}: {name} does not match its SHA-256 in {CHECKSUMS} "
                                  "(truncated or corrupted); resume from an earlier step or start again")


# ------------------------------------------------------------------------------------------------ run identity
def check_run_identity(root: str | Path, identity: dict[str, Any], resume: bool) -> None:
    """Refuse a checkpoint folder that holds another run's steps: without ``resume``, any complete checkpoint
    is another run's; with it, the saved identity must match (same config, data and global batch layout)."""
    root = Path(root)
    saved_file = root / RUN
    if not complete_checkpoints(root):
        return
    if not resume:
        raise CheckpointError(
            f"checkpoint folder {root} holds checkpoints of an earlier run; pass --resume to continue it, or "
            "choose another --checkpoint-dir (hfbridge never deletes another run's checkpoints)"
        )
    if not saved_file.is_file():
        raise CheckpointError(f"checkpoint folder {root} has no {RUN}: it was not written by this version of "
                              "hfbridge, so what run it belongs to cannot be checked")
    saved = json.loads(saved_file.read_text())
    changed = [key for key in sorted(set(saved) | set(identity)) if saved.get(key) != identity.get(key)]
    if changed:
        detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {identity.get(k)!r}" for k in changed)
        raise CheckpointError(
            f"--resume: the checkpoints in {root} belong to another run ({detail}). Resuming with another config, "
            "data or batch layout would train on the wrong samples; restore them, or start a new --checkpoint-dir"
        )


def write_run_identity(root: str | Path, identity: dict[str, Any]) -> None:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{RUN}.tmp"
    tmp.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / RUN)


# ------------------------------------------------------------------------------------------------ save / load
def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_sharded(
    path: str | Path,
    shards: dict[str, Any],
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write a complete-or-ignored checkpoint at ``path`` (``.../step-N``); every rank calls this.

    ``shards`` is the DCP state (sharded model and optimizer state dicts); ``trainer_state`` the rest, written
    by rank 0; ``meta`` goes to ``hfbridge.json``.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    root = path.parent
    tmp = root / (path.name + TMP_SUFFIX)
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    dcp.save(shards, checkpoint_id=str(tmp))
    (tmp / "rng" / f"rank-{rank}.json").write_text(json.dumps(_rng_state()))
    _barrier()
    if rank == 0:
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / META).write_text(json.dumps({**meta, "format": FORMAT_VERSION, "world_size": _world()}, indent=2,
                                           default=str))
        write_checksums(tmp)
        fsync_tree(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        fsync_tree(tmp)
        if path.exists():  # the same step saved again (a resumed run): replace it
            shutil.rmtree(path)
        os.rename(tmp, path)
        write_latest(root, path.name)
        prune(root, keep_last)
    _barrier()
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def _verified_everywhere(path: Path) -> None:
    """Rank 0 checks the checksums; every rank gets its verdict (so all fail together, none hangs)."""
    error = None
    if _rank() == 0:
        try:
            verify_checksums(path)
        except CheckpointError as e:
            error = str(e)
    if torch.distributed.is_initialized() and _world() > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CheckpointError(error)


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state, loaded without unpickling arbitrary objects (``weights_only=True``)."""
    try:
        return torch.load(path / TRAINER_STATE, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path}: {TRAINER_STATE} holds Python objects beyond tensors and plain containers, which "
            f"hfbridge refuses to unpickle ({str(e).splitlines()[0]})"
        ) from e


def load_sharded(path: Path, shards: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill ``shards`` (same keys as saved) in place from ``path``, after checking every file's checksum; returns
    ``(trainer_state, meta)`` and restores this rank's random number generators when the world size is the one
    saved."""
    import torch.distributed.checkpoint as dcp

    _verified_everywhere(path)
    meta = read_meta(path)
    trainer_state = load_trainer_state(path)
    dcp.load(shards, checkpoint_id=str(path))
    rng_file = path / "rng" / f"rank-{_rank()}.json"
    if meta.get("world_size") == _world() and rng_file.exists():
        _set_rng_state(json.loads(rng_file.read_text()))
    else:
        log.warning("resuming on %d processes from a checkpoint of %s: random states are not restored",
                    _world(), meta.get("world_size"))
    return trainer_state, meta
