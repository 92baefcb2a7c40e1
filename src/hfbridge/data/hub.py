"""Hugging Face hub datasets by name: ``--data owner/name`` read through ``datasets.load_dataset``.

The rule (docs/data.md, "Hub datasets"): an existing local file or folder always wins; a string of the form
``owner/name`` that is not a local path (and does not end in a data file's suffix) names a hub dataset; anything
else that does not exist is "data file not found". A hub dataset is a :class:`HubDataset`: its name as a string
(so it travels wherever a data path does) with the config, split and revision to read.

Its records become ``(where, record)`` pairs like a file's, ``where`` naming the dataset, config, split and row, so
the same format detection and record checks apply. With the hub offline (``HF_HUB_OFFLINE=1`` or
``HF_DATASETS_OFFLINE=1``) ``datasets`` reads the copy in its local cache (``HF_DATASETS_CACHE``); what is missing
there (the dataset, a config, a split, a revision) is an error naming it, raised before any model is loaded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

# The data file suffixes that make `data/train.jsonl` a (missing) file rather than a hub dataset; the readers'
# own table is hfbridge.data.sources.SUFFIXES, which imports this module.
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
HUB_ID = re.compile(rf"^{_PART}/{_PART}$")


class HubDatasetError(ValueError):
    """A hub dataset that cannot be read; the message names the dataset (and its config and split)."""


class HubDataset(str):
    """A hub dataset to read: the string is its name (``owner/name``), ``config`` its configuration (``None``:
    the dataset's only or default one), ``split`` and ``revision`` (``None``: the newest)."""

    config: str | None
    split: str
    revision: str | None

    def __new__(cls, name: str, config: str | None = None, split: str = "train", revision: str | None = None):
        self = super().__new__(cls, name)
        self.config, self.split, self.revision = config, split, revision
        return self

    def __reduce__(self):
        return HubDataset, (str(self), self.config, self.split, self.revision)

    @property
    def name(self) -> str:
        return str(self)

    @property
    def label(self) -> str:
        """The dataset as messages name it: ``owner/name (config 'c', split 'train', revision 'r')``."""
        parts = [f"config {self.config!r}"] if self.config else []
        parts.append(f"split {self.split!r}")
        if self.revision:
            parts.append(f"revision {self.revision!r}")
        return f"{self.name} ({', '.join(parts)})"

    def describe(self) -> dict:
        """The config, split and revision, for summaries."""
        return {"hub": self.name, "config": self.config, "split": self.split, "revision": self.revision}


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a hub dataset name, ``owner/name``, and is not a data file's name."""
    return bool(HUB_ID.match(text)) and not text.lower().endswith(FILE_SUFFIXES) and ".." not in text


def as_hub_dataset(name: str, config: str | None = None, split: str = "train", revision: str | None = None,
                   what: str = "hub") -> HubDataset:
    """A :class:`HubDataset`, its options checked (``what`` names the entry in errors)."""
    if not isinstance(name, str) or not looks_like_hub_id(name.strip()):
        raise HubDatasetError(f"{what}: a hub dataset is named owner/name (e.g. HuggingFaceH4/no_robots), got "
                              f"{name!r}")
    for key, value in (("config", config), ("split", split), ("revision", revision)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise HubDatasetError(f"{what}: the {key} of hub dataset {name.strip()} must be a non-empty name, got "
                                  f"{value!r}")
    return HubDataset(name.strip(), config and config.strip(), (split or "train").strip(), revision and revision.strip())


def offline() -> bool:
    """Whether ``datasets`` treats the hub as offline (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``)."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def cache_root() -> Path:
    import datasets

    return Path(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE)))


def _dataset_folder(name: str) -> Path:
    """Where ``datasets`` keeps a hub dataset it has prepared: ``<cache>/<owner>___<name>`` (its
    ``packaged_modules/cache`` reads the same place offline)."""
    from datasets.naming import camelcase_to_snakecase

    owner, dataset = name.split("/")
    return cache_root() / f"{owner}___{camelcase_to_snakecase(dataset)}"


def cached_copies(name: str) -> dict[str, list[str]]:
    """The configs of ``name`` in the local cache, each with the revisions (commit hashes) cached, newest last:
    the folders ``<config>/<version>/<hash>`` whose ``dataset_info.json`` names that config (what ``datasets``
    itself accepts offline)."""
    folder = _dataset_folder(name)
    found: dict[str, list[tuple[float, str]]] = {}
    for path in folder.glob("*/*/*"):
        info = path / "dataset_info.json"
        if not path.is_dir() or not info.is_file():
            continue
        try:
            config = json.loads(info.read_text(encoding="utf-8")).get("config_name")
        except (OSError, ValueError):
            continue
        if config == path.parts[-3]:
            found.setdefault(config, []).append((path.stat().st_mtime, path.name))
    return {config: [h for _, h in sorted(hashes)] for config, hashes in sorted(found.items())}


def download_command(source: HubDataset) -> str:
    args = [repr(source.name)] + ([repr(source.config)] if source.config else [])
    if source.revision:
        args.append(f"revision={source.revision!r}")
    return f'python -c "import datasets; datasets.load_dataset({", ".join(args)})"'


def _not_cached(source: HubDataset, detail: str = "") -> HubDatasetError:
    local = "" if Path(source.name).exists() else f"; no local file or folder {source.name} exists either"
    return HubDatasetError(
        f"hub dataset {source.label}: {detail or 'not'} in the local datasets cache (HF_DATASETS_CACHE="
        f"{cache_root()}) and the hub is offline{local}; download it once online with `{download_command(source)}` "
        "or set HF_HUB_OFFLINE=0 (and HF_DATASETS_OFFLINE=0)"
    )


def check_offline_copy(source: HubDataset) -> None:
    """With the hub offline: the dataset, its config and revision are in the local cache, else a clear error."""
    copies = cached_copies(source.name)
    if not copies:
        raise _not_cached(source, "is not")
    if source.config is None and len(copies) > 1:
        raise HubDatasetError(f"hub dataset {source.label}: has several configs in the local datasets cache "
                              f"({', '.join(copies)}); choose one with --data-config NAME (in a recipe: data.hub_config, "
                              "or config: in the source's entry)")
    config = source.config or next(iter(copies))
    if config not in copies:
        raise HubDatasetError(f"hub dataset {source.label}: no config {config!r} in the local datasets cache "
                              f"(HF_DATASETS_CACHE={cache_root()}); configs cached: {', '.join(copies)}")
    if source.revision and source.revision != copies[config][-1]:
        raise HubDatasetError(
            f"hub dataset {source.label}: offline, datasets reads the newest cached copy of config {config!r}, "
            f"revision {copies[config][-1]!r} (cached: {', '.join(copies[config])}), not {source.revision!r}; "
            f"download that revision once online with `{download_command(source)}` or set HF_HUB_OFFLINE=0 (and "
            "HF_DATASETS_OFFLINE=0)"
        )


def _load(source: HubDataset):
    """The split as a ``datasets.Dataset``, after the checks that name what is missing."""
    import datasets

    if offline():
        check_offline_copy(source)
    try:
        builder = datasets.load_dataset_builder(source.name, source.config, revision=source.revision)
    except ConnectionError as e:
        raise _not_cached(source, "is not") from e
    except FileNotFoundError as e:  # datasets' DatasetNotFoundError and friends
        raise HubDatasetError(f"hub dataset {source.label}: not found on the hub ({e})") from e
    except (ValueError, RuntimeError) as e:  # an unknown or missing config name; a loading script
        raise HubDatasetError(f"hub dataset {source.label}: {e}") from e
    config = builder.config.name
    splits = builder.info.splits
    where = f"hub dataset {source.name} (config {config!r}"
    if splits:  # known from the dataset's card, or offline from the cached copy
        if source.split not in splits:
            raise HubDatasetError(f"{where}): no split {source.split!r}; its splits: {', '.join(splits)} (choose one "
                                  "with --data-split, --val-split or --test-split, or split: in a mixture entry)")
        if offline() and not splits[source.split].num_examples:  # (datasets cannot read an empty split)
            raise HubDatasetError(f"{where}, split {source.split!r}): the data set is empty")
    try:
        dataset = datasets.load_dataset(source.name, source.config, split=source.split, revision=source.revision)
    except ConnectionError as e:
        raise _not_cached(source, "is not") from e
    except ValueError as e:  # e.g. 'Instruction "x" corresponds to no data!' for an empty split
        empty = "corresponds to no data" in str(e)
        raise HubDatasetError(f"{where}, split {source.split!r}): "
                              + ("the data set is empty" if empty else str(e))) from e
    return dataset, config


def read_hub_records(source: HubDataset) -> list[tuple[str, dict]]:
    """Every record of the dataset's split, each with where it came from (dataset, config, split and row)."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # not datasets' "using the latest cached version" on every read
    try:
        dataset, config = _load(source)
    finally:
        datasets.logging.set_verbosity(verbosity)
    where = f"hub dataset {source.name} (config {config!r}, split {source.split!r}) row"
    rows = [(f"{where} {i}", record) for i, record in enumerate(dataset)]
    if not rows:
        raise HubDatasetError(f"hub dataset {source.name} (config {config!r}, split {source.split!r}): the data set "
                              "is empty")
    return rows
