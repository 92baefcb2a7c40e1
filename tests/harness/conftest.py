"""Harness tests index a few lm-eval task folders, not lm-eval's whole registry (about 10 s per process)."""

import pytest


@pytest.fixture
def small_registry(monkeypatch):
    """lm-eval's registry as the bundled tasks and lm-eval's own ``arc`` folder (arc_easy, arc_challenge): the
    code path of a name outside the bundled tasks, with an index of a handful of files."""
    pytest.importorskip("lm_eval")
    from pathlib import Path

    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    from hfbridge.harness import lm_eval_runner as runner

    arc = Path(lm_eval.tasks.__file__).parent / "arc"
    monkeypatch.setattr(runner, "_full_task_manager",
                        lambda dirs: TaskManager(include_path=[*dirs, str(arc)], include_defaults=False))
