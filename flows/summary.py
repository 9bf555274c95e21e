"""The short table a run ends with (terminal and Prefect artifact alike)."""

from __future__ import annotations

from typing import Any


def summary_markdown(result: dict[str, Any]) -> str:
    """Source accuracy, target accuracy per run, registered models, and where to look next."""
    lines = []
    source = result.get("source")
    if source:
        lines.append(
            f"Source model on the source test set: accuracy {source['test_accuracy']:.2%} "
            f"(registered as {source.get('registered', 'fmnist-source')})"
        )
        lines.append("")
    lines.append("| run | source | strategy | target test accuracy | macro-F1 | registered |")
    lines.append("|---|---|---|---|---|---|")
    for name, run in result["runs"].items():
        lines.append(
            f"| {name} | {run['source']} | {run['strategy']} | {run['test_accuracy']:.2%} "
            f"| {run['macro_f1']:.3f} | {run.get('registered', '-')} |"
        )
    lines.append("")
    lines.append("Compare the runs in the MLflow UI: `make ui`, then open http://127.0.0.1:5000")
    return "\n".join(lines)
