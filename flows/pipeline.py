"""The transfer flow: data -> pretrain -> weights -> extract -> train -> evaluate, each a cached Prefect task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.layout import Layout
from flows.orphans import claim_and_crash_orphans
from flows.stages import Recorder, dvc_commit, prefect_runner, run_all
from flows.summary import summary_markdown, summary_rows
from headstart.config import Params


@flow(name="transfer", validate_parameters=False)
def transfer(params: Params | dict[str, Any], root: Path | str, commit: bool = False) -> dict[str, Any]:
    """A second run with unchanged inputs reuses every stage (content-keyed, whichever orchestrator ran it).

    With `commit` (the params are the project's params.yaml, unchanged), the stages it computed are
    recorded in dvc.lock, so `dvc repro` afterwards has nothing to do. A scheduled run (`headstart schedule`)
    gets the params as the JSON its deployment stores.
    """
    params = Params.model_validate(params)
    claim_and_crash_orphans()
    lay = Layout(Path(root))
    runner = Recorder(prefect_runner)
    records = run_all(params, lay, runner)
    if commit:
        dvc_commit(lay, runner.computed)
    result = summary_rows(records, params)
    create_markdown_artifact(summary_markdown(result), key="transfer-summary", description="headstart run summary")
    return result


def serve_transfer(
    params: Params, root: Path, name: str, cron: str | None = None, interval: float | None = None
) -> None:
    """Serve the flow on a schedule until interrupted: one run at a time, the params as loaded now.

    Needs a Prefect server (PREFECT_API_URL): the ephemeral one schedules nothing. On Ctrl-C or
    SIGTERM the schedule is paused, so no runs pile up while nothing serves them (Prefect's own
    pause on shutdown does not always happen). The flow is named by module path
    (flows.pipeline.transfer), so runs start from any working folder.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import EntrypointType

    try:
        transfer.serve(
            name=name,
            cron=cron,
            interval=interval,
            parameters={"params": params.model_dump(mode="json"), "root": str(root)},
            limit=1,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    finally:
        with get_client(sync_client=True) as client:
            client.pause_deployment(client.read_deployment_by_name(f"{transfer.name}/{name}").id)
