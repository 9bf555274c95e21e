"""Benchmarks that print ratios measured side by side in one run: `python -m bench [--quick] [--only NAME]`."""

BENCHMARKS = (
    "extraction",
    "extraction_codecs",
    "cached_head",
    "warm_rerun",
    "incremental",
    "memory",
    "store_reads",
    "sklearn_baseline",
    "partial",
    "commands",
    "threads",
    "streaming",
    "head_grid",
    "views",
)
"""Module names under bench/ in table order, each with `NAME` and `run(workspace) -> list[Row]`."""
