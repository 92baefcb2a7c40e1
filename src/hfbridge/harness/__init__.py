"""lm-evaluation-harness on hfbridge models: ``hfbridge eval`` (:mod:`hfbridge.harness.cli`), the recipe's
``eval.tasks`` (scored before and after a fine-tune on the in-memory model), and the tasks shipped with hfbridge
(:mod:`hfbridge.harness.bundled`). lm-eval is optional: ``pip install "hfbridge[eval]"``."""

from hfbridge.harness.bundled import BUNDLED_TASKS, TASKS_DIR

__all__ = ["BUNDLED_TASKS", "TASKS_DIR"]
