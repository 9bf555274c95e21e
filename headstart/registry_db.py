"""The one registry read that commands need often (a version's weights sha256), straight from MLflow's sqlite file.

Importing MLflow and opening its SQLAlchemy store costs about 2 s, more than the rest of
`headstart predict` together. When the tracking URI is the project's sqlite file, the alias or
version and its `weights_sha256` tag are three indexed rows of MLflow's own tables
(`registered_model_aliases`, `model_versions`, `model_version_tags`), read here read-only.
Only a positive, complete answer is returned: anything else (another backend, a schema this
reader does not know, no such alias, the special `latest` alias) is None, and the caller asks
MLflow itself, which gives the proper error. tests/unit/test_weights.py checks the two agree.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

DELETED = "Deleted_Internal"
"""The stage MLflow gives a deleted model version (it keeps the row and its tags)."""


@dataclass(frozen=True)
class RegistryVersion:
    """A registered model version and the tags headstart reads."""

    name: str
    version: str
    tags: dict[str, str]


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file a `sqlite:///` tracking URI names (it may not exist yet), or None for any other backend."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return Path(tracking_uri[len(prefix) :].split("?", 1)[0])


def lookup(
    name: str, alias: str | None, version: str | None, tracking_uri: str | None = None
) -> RegistryVersion | None:
    """`name@alias` or `name/version` with its tags, read without MLflow; None when MLflow must answer."""
    path = sqlite_path(tracking_uri if tracking_uri is not None else os.environ.get("MLFLOW_TRACKING_URI", ""))
    if path is None or not path.is_file() or (alias is not None and alias.lower() == "latest"):
        return None
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            if alias is not None:
                row = db.execute(
                    "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?", (name, alias)
                ).fetchone()
                if row is None:
                    return None
                version = str(row[0])
            number = int(version)
            live = db.execute(
                "SELECT 1 FROM model_versions WHERE name = ? AND version = ? AND current_stage != ?",
                (name, number, DELETED),
            ).fetchone()
            if live is None:
                return None
            tags = db.execute(
                "SELECT key, value FROM model_version_tags WHERE name = ? AND version = ?", (name, number)
            ).fetchall()
    except sqlite3.Error:
        return None  # not MLflow's schema (or locked, or damaged): MLflow decides
    return RegistryVersion(name, version, {str(k): str(v) for k, v in tags})
