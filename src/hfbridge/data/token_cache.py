"""The tokenization cache: tokenized samples on disk, so a second run on the same data skips tokenization.

An entry is a folder ``<root>/<key>/`` (root: ``data.cache_dir``, else ``$HFBRIDGE_TOKEN_CACHE``, else ``tokens/``
in hfbridge's cache folder, ``~/.cache/hfbridge`` by default) holding ``input_ids.npy`` and ``labels.npy`` (int32, every sample one after the
other), ``offsets.npy`` (int64, sample ``k`` is ``[offsets[k], offsets[k + 1])``), ``truncated.npy`` and
``meta.json``. It is written into a temporary folder and renamed into place (:func:`hfbridge.io.atomic_dir`), so a
reader sees a whole entry or none, and processes writing the same entry at once each leave a whole one.

The key is a SHA-256 of:

* the records' content: every record tokenized, as canonical JSON, in order (what is tokenized, whichever file
  type it came from, so a changed record, a changed cap or reordered lines never reuse an entry);
* the tokenizer: its ``tokenizer.json`` (the fast tokenizer's full serialisation: vocabulary, merges,
  normalizer, pre-tokenizer, post-processor, added tokens), its class, its special tokens and BOS setting;
* the chat template, the format, ``max_length``, the versions of ``tokenizers``/``transformers`` and of this
  cache's layout.

The first run tokenizes in several processes when a source has more than :data:`PARALLEL_THRESHOLD` records
(chunks in order, so the samples are those of one process).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

from hfbridge.console import say
from hfbridge.data.formats import TokenizedSample, tokenize_record

CACHE_VERSION = 1
PARALLEL_THRESHOLD = 2000
FILES = ("input_ids.npy", "labels.npy", "offsets.npy", "truncated.npy", "meta.json")


def default_root() -> Path:
    """``$HFBRIDGE_TOKEN_CACHE``, else ``tokens/`` in hfbridge's cache folder (``$HFBRIDGE_CACHE``, else
    ``$XDG_CACHE_HOME/hfbridge``, else ``~/.cache/hfbridge``)."""
    from hfbridge.models.loading import cache_dir

    if os.environ.get("HFBRIDGE_TOKEN_CACHE"):
        return Path(os.environ["HFBRIDGE_TOKEN_CACHE"])
    return cache_dir() / "tokens"


def records_fingerprint(records: Sequence) -> str:
    """SHA-256 of the records as canonical JSON, in order (values JSON cannot hold by their ``repr``)."""
    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=repr).encode())
        h.update(b"\n")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides a tokenizer's ids: its ``tokenizer.json`` (or, for a slow tokenizer, its
    vocabulary), class, special tokens and whether it adds BOS. The chat template is keyed apart."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {name: getattr(tokenizer, name, None) for name in
               ("bos_token_id", "eos_token_id", "pad_token_id", "add_bos_token", "add_eos_token")}
    h.update(json.dumps([type(tokenizer).__name__, special], sort_keys=True, default=repr).encode())
    return h.hexdigest()


def cache_key(records_fp: str, tokenizer_fp: str, chat_template, fmt: str, max_length: int | None) -> str:
    import tokenizers
    import transformers

    parts = {"records": records_fp, "tokenizer": tokenizer_fp, "chat_template": chat_template or "",
             "format": fmt, "max_length": max_length, "layout": CACHE_VERSION,
             "tokenizers": tokenizers.__version__, "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------------- tokenizing
_WORKER: dict = {}


def _init_worker(tokenizer, fmt: str, max_length: int | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tokenizer=tokenizer, fmt=fmt, max_length=max_length)


def _tokenize_chunk(records: list) -> list[tuple[list[int], list[int], bool]]:
    tok, fmt, max_length = _WORKER["tokenizer"], _WORKER["fmt"], _WORKER["max_length"]
    out = []
    for record in records:
        s = tokenize_record(tok, record, fmt, max_length)
        out.append((s.input_ids, s.labels, s.truncated))
    return out


def tokenize_parallel(tokenizer, records: Sequence, fmt: str, max_length: int | None,
                      threshold: int = PARALLEL_THRESHOLD, processes: int | None = None) -> list[TokenizedSample]:
    """The samples of ``records``, in order: in one process up to ``threshold`` records, else in a pool of
    ``processes`` (default: the CPUs this process may use, at most 8) over chunks taken in order."""
    processes = processes or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                 else (os.cpu_count() or 1))
    if len(records) <= threshold or processes < 2:
        return [tokenize_record(tokenizer, r, fmt, max_length) for r in records]
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    size = math.ceil(len(records) / (processes * 4))
    chunks = [list(records[i : i + size]) for i in range(0, len(records), size)]
    with multiprocessing.get_context(method).Pool(processes, _init_worker, (tokenizer, fmt, max_length)) as pool:
        parts = pool.map(_tokenize_chunk, chunks)
    return [TokenizedSample(ids, labels, truncated) for part in parts for ids, labels, truncated in part]


# --------------------------------------------------------------------------------------------------- the store
def _save(folder: Path, samples: Sequence[TokenizedSample], meta: dict) -> None:
    import numpy as np

    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat_ids = [t for s in samples for t in s.input_ids]
    flat_labels = [t for s in samples for t in s.labels]
    np.save(folder / "input_ids.npy", np.asarray(flat_ids, dtype=np.int32))
    np.save(folder / "labels.npy", np.asarray(flat_labels, dtype=np.int32))
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "truncated.npy", np.array([s.truncated for s in samples], dtype=bool))
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _load(folder: Path, count: int) -> list[TokenizedSample] | None:
    """An entry's samples, or ``None`` when it is absent, incomplete or not of ``count`` samples."""
    import numpy as np

    if not all((folder / name).is_file() for name in FILES):
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        ids = np.load(folder / "input_ids.npy").tolist()
        labels = np.load(folder / "labels.npy").tolist()
        offsets = np.load(folder / "offsets.npy").tolist()
        truncated = np.load(folder / "truncated.npy").tolist()
    except (OSError, ValueError):
        return None
    if meta.get("samples") != count or len(offsets) != count + 1 or len(ids) != len(labels):
        return None
    return [TokenizedSample(ids[a:b], labels[a:b], bool(t)) for a, b, t in zip(offsets, offsets[1:], truncated)]


def cached_tokenize(tokenizer, records: Sequence, fmt: str, max_length: int | None, *, enabled: bool = True,
                    rebuild: bool = False, root: str | Path | None = None, label: str = "train",
                    threshold: int = PARALLEL_THRESHOLD) -> tuple[list[TokenizedSample], str]:
    """The samples of ``records`` (same as :func:`~hfbridge.data.formats.tokenize_record` on each), from the
    cache when an entry has this key; returns them and ``"hit"``, ``"miss"``, ``"rebuilt"`` or ``"off"``
    (printed as ``tokenization cache: ...``)."""
    from hfbridge.io import atomic_dir

    t0 = time.time()
    if not enabled:
        samples = tokenize_parallel(tokenizer, records, fmt, max_length, threshold)
        say(f"tokenization cache: off ({label}: {len(samples)} samples tokenized in {time.time() - t0:.1f}s)")
        return samples, "off"
    key = cache_key(records_fingerprint(records), tokenizer_fingerprint(tokenizer),
                    getattr(tokenizer, "chat_template", None), fmt, max_length)
    folder = Path(root) if root else default_root()
    entry = folder / key
    if not rebuild:
        samples = _load(entry, len(records))
        if samples is not None:
            say(f"tokenization cache: hit ({label}: {len(samples)} samples read from {entry} in "
                f"{time.time() - t0:.1f}s)")
            return samples, "hit"
    samples = tokenize_parallel(tokenizer, records, fmt, max_length, threshold)
    seconds = time.time() - t0
    meta = {"samples": len(samples), "format": fmt, "max_length": max_length, "source": label,
            "tokenizer": getattr(tokenizer, "name_or_path", ""), "created": time.time(), "layout": CACHE_VERSION}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_dir(entry, overwrite=True) as tmp:
            _save(tmp, samples, meta)
    except OSError as e:  # a cache that cannot be written costs the next run time, not this one its result
        say(f"tokenization cache: could not write {entry} ({e}); continuing without it")
    status = "rebuilt" if rebuild else "miss"
    say(f"tokenization cache: {status} ({label}: {len(samples)} samples tokenized in {seconds:.1f}s, "
        f"saved to {entry})")
    return samples, status
