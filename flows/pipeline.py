"""The transfer flow: data -> pretrain -> weights -> extract -> train -> evaluate, each a cached Prefect task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.layout import Layout
from flows.stages import prefect_runner, run_all
from flows.summary import summary_markdown
from headstart.config import Params


@flow(name="transfer", validate_parameters=False)
def transfer(params: Params, root: Path) -> dict[str, Any]:
    """A second run with unchanged inputs reuses every task result (content-keyed caching)."""
    result = run_all(params, Layout(root), prefect_runner)
    create_markdown_artifact(summary_markdown(result), key="transfer-summary", description="headstart run summary")
    return result
