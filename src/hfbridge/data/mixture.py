"""Data mixtures: several training sources, each with a weight, a cap and a number of passes, mixed by one rule.

A source is ``PATH``, ``PATH:WEIGHT`` (``--data a.jsonl:3``) or, in a recipe, a mapping
``{path, weight: 1, max_samples: null, epochs: 1}``. The rule (docs/data.md), for sources ``i``:

1. the pool ``A_i``: the first ``max_samples`` records of the source in file order (all of them without a cap);
2. the budget ``C_i = A_i * epochs_i``: how many samples the source may give to one mixture epoch;
3. the shares ``p_i = w_i / sum(w)``; the mixture epoch holds ``T = min_i floor(C_i / p_i)`` samples, the most
   for which no source exceeds its budget (the mixture stops when the first source has given its budget);
4. the counts ``n_i``: ``T * p_i`` rounded down, the samples left over going one each to the largest fractional
   parts (ties: the earlier source), so ``sum(n_i) == T`` and ``n_i <= C_i``;
5. source ``i`` gives ``n_i = k * A_i + r`` samples: ``k`` whole passes over its pool in file order, then ``r``
   records drawn without replacement by a generator seeded with ``(seed, i)``, kept in file order;
6. the mixture is the sources' samples one source after the other. It is the list of training records one epoch
   of training goes through; the data module shuffles it each epoch (``train.seed``), as any training set.

One source with no cap and one epoch is its records, unchanged, in file order (the run a plain ``--data`` gives).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from hfbridge.data.datamodule import CausalLMDataModule
from hfbridge.data.formats import FORMATS, TokenizedSample
from hfbridge.data.hub import HubDataset, as_hub_dataset
from hfbridge.data.sources import DataSourceError, resolve_source

SOURCE_KEYS = ("path", "weight", "max_samples", "epochs")
HUB_KEYS = ("hub", "config", "split", "revision")  # a hub dataset's entry: {hub: owner/name, config, split, revision}


@dataclass(frozen=True)
class SourceSpec:
    """One training source of a mixture; ``position`` is its index in ``data.train``."""

    path: str
    weight: float = 1.0
    max_samples: int | None = None
    epochs: int = 1
    position: int = 0

    @property
    def where(self) -> str:
        return f"data.train[{self.position}] ({self.path})"


def _number(text, what: str) -> float:
    if isinstance(text, bool):
        raise ValueError(f"{what}: must be a positive number, got {text!r}")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: must be a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what}: must be a positive number, got {text!r}")
    return value


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}: must be an integer >= 1, got {value!r}")
    return value


def parse_source(item, position: int = 0, hub: dict | None = None) -> SourceSpec:
    """One ``data.train`` entry as a :class:`SourceSpec`; a clear error naming the entry otherwise.

    A string is ``PATH`` or ``PATH:WEIGHT``: it is split at its last ``:`` unless it names an existing file as a
    whole. A path that names a hub dataset (:func:`~hfbridge.data.sources.resolve_source`), or a mapping with
    ``hub:``, becomes a :class:`~hfbridge.data.hub.HubDataset` read with its entry's ``config``, ``split`` and
    ``revision``, else ``hub``'s (the run's ``data.hub_config``, ``data.train_split``, ``data.hub_revision``)."""
    where = f"data.train[{position}]"
    hub = {"config": None, "split": "train", "revision": None, **(hub or {})}
    if isinstance(item, str):
        text = item.strip()
        if not text:
            raise ValueError(f"{where}: an empty path")
        if ":" in text and not Path(text).exists():
            path, _, weight = text.rpartition(":")
            if not path or not weight:
                raise ValueError(f"{where}: {item!r} is not PATH or PATH:WEIGHT (e.g. --data train.jsonl:3)")
            try:
                value = _number(weight, f"{where}: the weight in {item!r}")
            except ValueError as e:
                raise ValueError(f"{e} (expected PATH or PATH:WEIGHT, e.g. --data train.jsonl:3)") from None
            return SourceSpec(resolve_source(path, **hub), value, position=position)
        return SourceSpec(resolve_source(text, **hub), position=position)
    if isinstance(item, dict):
        keys = SOURCE_KEYS + HUB_KEYS
        for key in item:
            if key not in keys:
                close = difflib.get_close_matches(str(key), keys, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{where}.{key}: unknown key{hint}; allowed: {', '.join(keys)}")
        if "hub" in item:
            if "path" in item:
                raise ValueError(f"{where}: give path (a local file or folder) or hub (a hub dataset), not both")
            options = {key: item.get(key, hub[key]) for key in ("config", "split", "revision")}
            path = as_hub_dataset(item["hub"], what=f"{where}.hub", **options)
        else:
            path = item.get("path")
            extra = [key for key in HUB_KEYS if key in item]
            if extra:
                raise ValueError(f"{where}.{extra[0]}: only for a hub dataset ({{hub: owner/name, config, split, "
                                 "revision}}), not a path")
            if not isinstance(path, str) or not path.strip():
                raise ValueError(f"{where}.path: required, a data file or folder, got {path!r}")
            path = resolve_source(path.strip(), **hub)
        weight = _number(item.get("weight", 1.0), f"{where}.weight")
        cap = item.get("max_samples")
        cap = None if cap is None else _positive_int(cap, f"{where}.max_samples")
        epochs = _positive_int(item.get("epochs", 1), f"{where}.epochs")
        return SourceSpec(path, weight, cap, epochs, position)
    raise ValueError(f"{where}: must be a path, PATH:WEIGHT or a mapping {{path, weight, max_samples, epochs}} "
                     f"(or {{hub, config, split, revision, ...}}), got {type(item).__name__} {item!r}")


def parse_sources(train, hub: dict | None = None) -> list[SourceSpec]:
    """``data.train`` (a string or a list of entries) as its sources; ``hub``: the config, split and revision of
    hub datasets whose entries do not set their own."""
    items = [train] if isinstance(train, str) else list(train)
    if not items:
        raise ValueError("data.train: an empty list; give at least one source, or null for the demo data")
    return [parse_source(item, i, hub) for i, item in enumerate(items)]


def normalise_train(train):
    """``data.train`` as the config keeps it: every entry checked, and one plain path (``--data a.jsonl``) kept as
    the string it has always been."""
    if not isinstance(train, list):
        return train
    specs = parse_sources(train)
    if len(train) == 1 and isinstance(train[0], str) and specs[0].path == train[0].strip():
        return specs[0].path
    return train


# --------------------------------------------------------------------------------------------------- the rule
def mixture_counts(budgets: Sequence[int], weights: Sequence[float]) -> list[int]:
    """The samples each source gives to one mixture epoch (steps 3 and 4 of the module docstring), in exact
    rational arithmetic."""
    if len(budgets) != len(weights) or not budgets:
        raise ValueError("one budget and one weight per source")
    w = [Fraction(str(x)) for x in weights]
    total_w = sum(w)
    shares = [x / total_w for x in w]
    total = min(math.floor(c / p) for c, p in zip(budgets, shares))
    exact = [total * p for p in shares]
    counts = [math.floor(x) for x in exact]
    left = total - sum(counts)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def draw(pool: int, count: int, seed: int, position: int) -> list[int]:
    """Step 5: ``count`` indices into a pool of ``pool`` records: whole passes in order, then a seeded draw
    without replacement, in order."""
    import numpy as np

    passes, rest = divmod(count, pool)
    out = list(range(pool)) * passes
    if rest:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, position])))
        out += sorted(int(i) for i in rng.permutation(pool)[:rest])
    return out


@dataclass
class Source:
    """A source read and checked: its records (the pool only), their format and what the mixture draws."""

    spec: SourceSpec
    records: list
    format: str
    indices: list[int] = field(default_factory=list)


@dataclass
class Mixture:
    """The sources and the training records they give (``records[k]`` came from source ``origin[k]``)."""

    sources: list[Source]
    records: list
    origin: list[int]

    @property
    def formats(self) -> list[str]:
        return [s.format for s in self.sources]

    @property
    def format(self) -> str:
        """The one format of every source, or the formats joined with ``+``."""
        formats = sorted(set(self.formats))
        return formats[0] if len(formats) == 1 else "+".join(formats)


PREFERENCE_FIELDS = {"chosen", "rejected"}


def _clash(rows_first, where: str, task_label: str) -> str | None:
    """What is wrong when a source holds another task's records (preference pairs or KTO examples given to sft)."""
    if isinstance(rows_first, dict):
        fields = set(rows_first)
        if PREFERENCE_FIELDS <= fields:
            return (f"{where}: holds preference records (prompt/chosen/rejected), which {task_label} cannot train; "
                    "train them with --method dpo (or another preference method), or drop this source")
        if {"prompt", "completion", "label"} <= fields and isinstance(rows_first.get("label"), bool):
            return (f"{where}: holds KTO records (prompt/completion/label); {task_label} would ignore the label: "
                    "train them with --method kto, or drop this source")
    return None


def build_mixture(specs: Sequence[SourceSpec], load: Callable[[str, str], tuple[list, str]], fmt: str, seed: int,
                  mixed_formats: bool = True, task_label: str = "this task") -> Mixture:
    """Read every source with ``load(path, fmt)`` (each detects its own format under ``fmt: auto``), check them
    against each other and the task, and draw the mixture (module docstring). Every problem is raised before any
    model is loaded, naming the source's position."""
    sources: list[Source] = []
    several = len(specs) > 1  # one source's errors read as they always have
    for spec in specs:
        if several and not isinstance(spec.path, HubDataset) and not Path(spec.path).exists():
            raise DataSourceError(f"{spec.where}: data file not found: {spec.path}")
        try:
            records, source_fmt = load(spec.path, fmt)
        except ValueError as e:
            clash = _clash(_first_record(spec.path), spec.where if several else spec.path, task_label) \
                if mixed_formats else None
            if clash:
                raise DataSourceError(clash) from None
            if not several:
                raise
            try:
                error = type(e)(f"{spec.where}: {e}")
            except TypeError:
                error = ValueError(f"{spec.where}: {e}")
            raise error from None
        if not records:
            raise DataSourceError(f"{spec.where}: the data set is empty")
        if mixed_formats:
            clash = _clash(records[0], spec.where if several else spec.path, task_label)
            if clash:
                raise DataSourceError(clash)
        pool = records[: spec.max_samples] if spec.max_samples else records
        sources.append(Source(spec, pool, source_fmt))
    if not mixed_formats and len({s.format for s in sources}) > 1:
        found = ", ".join(f"{s.spec.where}: {s.format}" for s in sources)
        raise DataSourceError(f"data.train: {task_label} trains on one format, but the sources hold {found}")
    counts = mixture_counts([len(s.records) * s.spec.epochs for s in sources], [s.spec.weight for s in sources])
    records, origin = [], []
    for i, (source, count) in enumerate(zip(sources, counts)):
        source.indices = draw(len(source.records), count, seed, i)
        records += [source.records[j] for j in source.indices]
        origin += [i] * count
    return Mixture(sources, records, origin)


def _first_record(path: str):
    """The first record of a file, to tell what kind of records it holds (``None`` when it cannot be read)."""
    from hfbridge.data.sources import read_records

    try:
        return read_records(path)[0][1]
    except (ValueError, OSError):
        return None


# --------------------------------------------------------------------------------------------------- reporting
def realised_shares(mixture: Mixture, samples: Sequence[Sequence[TokenizedSample | None]]) -> dict:
    """What each source gave to the training set: samples and label tokens, counted and as shares.
    ``samples[i][k]``: the ``k``-th drawn sample of source ``i`` (``None``: dropped, no trained token)."""
    rows = []
    for source, drawn in zip(mixture.sources, samples):
        kept = [s for s in drawn if s is not None]
        rows.append({"path": str(source.spec.path), "format": source.format, "weight": source.spec.weight,
                     "max_samples": source.spec.max_samples, "epochs": source.spec.epochs,
                     "records": len(source.records), "samples": len(kept),
                     "label_tokens": sum(s.num_label_tokens for s in kept)})
        if isinstance(source.spec.path, HubDataset):  # which config, split and revision of the hub dataset
            rows[-1].update(source.spec.path.describe(), path=source.spec.path.label)
    total_samples = sum(r["samples"] for r in rows) or 1
    total_tokens = sum(r["label_tokens"] for r in rows) or 1
    weight = sum(r["weight"] for r in rows)
    for r in rows:
        r["target_share"] = round(r["weight"] / weight, 6)
        r["sample_share"] = round(r["samples"] / total_samples, 6)
        r["label_token_share"] = round(r["label_tokens"] / total_tokens, 6)
    return {"rule": "samples", "samples": sum(r["samples"] for r in rows),
            "label_tokens": sum(r["label_tokens"] for r in rows), "sources": rows}


def share_lines(report: dict) -> list[str]:
    return [f"  [{i}] {r['path']} ({r['format']}, weight {r['weight']:g}): {r['samples']} samples "
            f"({r['sample_share']:.1%}), {r['label_tokens']} label tokens ({r['label_token_share']:.1%})"
            for i, r in enumerate(report["sources"])]


# --------------------------------------------------------------------------------------------------- data module
class MixtureDataModule(CausalLMDataModule):
    """:class:`~hfbridge.data.datamodule.CausalLMDataModule` over a mixture: each source tokenized in its own
    format by ``tokenize(records, fmt, label)`` (the tokenization cache), its drawn samples put together in the
    mixture's order. Batching, packing, shuffling, resuming and data-parallel sharding are the base class's."""

    def __init__(self, tokenizer, mixture: Mixture, val_records: list | None, val_format: str,
                 tokenize: Callable[[list, str, str], list[TokenizedSample]], **kwargs):
        self.mixture = mixture
        self._tokenize_with = tokenize
        self.report: dict | None = None
        super().__init__(tokenizer, mixture.records, val_records, data_format=val_format, **kwargs)

    def _load_records(self, data, data_format: str) -> tuple[list, str]:
        if data_format not in FORMATS:  # validation records follow the training data's format when it is one
            data_format = self.mixture.formats[0]
        return list(data), data_format  # read and checked source by source (build_mixture)

    def _tokenize_records(self, records: list, split: str) -> list[TokenizedSample]:
        if split != "train":
            return self._tokenize_with(records, self.data_format, split)
        drawn: list[list[TokenizedSample]] = []
        for i, source in enumerate(self.mixture.sources):
            samples = self._tokenize_with(source.records, source.format, f"train[{i}] {source.spec.path}")
            drawn.append([samples[j] for j in source.indices])
        self.report = realised_shares(self.mixture, [[s if s.num_label_tokens else None for s in d] for d in drawn])
        return [s for d in drawn for s in d]  # the base class drops (and counts) samples with no trained token
