"""A hub dataset in a local ``datasets`` cache, as one online ``load_dataset("owner/name", config)`` leaves it.

Online, ``datasets`` reads the repository's card (``README.md`` with its ``configs:``) and data files, and its
packaged builder (here ``json``) writes ``<cache>/<owner>___<name>/<config>/0.0.0/<commit>/`` holding
``dataset_info.json`` and ``<name>-<split>.arrow``. Offline, ``load_dataset("owner/name")`` finds that folder
(``datasets.packaged_modules.cache``). Here the same repository is laid out on disk and prepared by the same
module factory and builder (``load_dataset_builder`` on the folder: the code path of a hub repository, with a
local base path), and the prepared folder is placed where a hub load puts it: under the owner's name, with a
commit hash for the hash. Nothing is patched; the offline read under test is ``datasets``' own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_repo(folder: Path, configs: dict[str, dict[str, list[dict]]]) -> Path:
    """A dataset repository: one JSONL file per config and split, and a card declaring them."""
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            path = folder / config / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            card += [f"  - split: {split}", f"    path: {config}/{split}.jsonl"]
    card.append("---")
    (folder / "README.md").write_text("\n".join(card) + "\n")
    return folder


def build_hub_cache(cache: Path, repo_id: str, configs: dict[str, dict[str, list[dict]]], work: Path,
                    commit: str = COMMIT) -> None:
    """Put ``repo_id``'s ``configs`` ({config: {split: records}}) into the ``datasets`` cache ``cache``."""
    import datasets

    owner, name = repo_id.split("/")
    repo = write_repo(work / "repos" / owner / name, configs)  # the folder's name is the dataset's name
    for config in configs:
        builder = datasets.load_dataset_builder(str(repo), config, cache_dir=str(work / "prepare"))
        builder.download_and_prepare()
        prepared = Path(builder.cache_dir)
        assert prepared.parts[-4:-1] == (name, config, "0.0.0"), prepared  # <name>/<config>/<version>/<hash>
        target = cache / f"{owner}___{name}" / config / "0.0.0" / commit
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(prepared, target)
