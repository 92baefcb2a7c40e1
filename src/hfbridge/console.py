"""What a run prints: one line per event, from rank 0 only."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job, or the only process."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    """Print ``[hfbridge] message`` on rank 0 (other ranks stay quiet)."""
    if is_main_process():
        print(f"[hfbridge] {message}", flush=True)
