"""A long task's progress as a Prefect progress artifact (a bar in the UI) inside a Prefect run; a no-op elsewhere.

The same task bodies run under DVC as `task.fn(...)`, with no Prefect run around them: there
`TaskProgress` does nothing, so they need no second code path.
"""

from __future__ import annotations

from typing import Any


def _run_context() -> Any:
    """The current Prefect task run context, else the flow run context, else None (DVC, plain tests)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() or FlowRunContext.get()


class TaskProgress:
    """`advance(done)` moves the bar to done/total; `finish()` sets it to 100% (an early stop is a finish too).

    The artifact belongs to the current task run (its Artifacts tab in the Prefect UI); its
    description names the run, e.g. "train-3f2: training epochs".
    """

    def __init__(self, description: str, total: int):
        self.total = total
        self.artifact_id = None
        context = _run_context() if total > 0 else None
        if context is None:
            return
        from prefect.artifacts import create_progress_artifact

        run = getattr(context, "task_run", None) or context.flow_run
        self.artifact_id = create_progress_artifact(0.0, description=f"{run.name}: {description}")

    def advance(self, done: float) -> None:
        if self.artifact_id is not None:
            self._set(min(100.0, 100.0 * done / self.total))

    def finish(self) -> None:
        if self.artifact_id is not None:
            self._set(100.0)

    def _set(self, percent: float) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self.artifact_id, percent)
