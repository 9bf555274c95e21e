"""The code's structure keeps the pipeline honest: layers point down, and dvc.yaml is what the code says.

Each rule is checked on the real tree and on a deliberately broken one, so a checker that
cannot fail would be seen failing here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flows import dvcyaml
from headstart import codeversion
from headstart.codeversion import PROJECT, direct_imports, import_closure, stage_code
from headstart.config import Params, load_params

LAYERS = {"headstart": set(), "tasks": {"headstart"}, "flows": {"headstart", "tasks", "flows"}}
"""Package -> the project packages its modules may import: the library nothing above it, a task only the library."""


def layer_violations(root: Path = PROJECT) -> list[str]:
    """Every import that points up (headstart -> tasks/flows) or sideways (one task module -> another)."""
    found = []
    for package, allowed in LAYERS.items():
        for path in sorted((root / package).glob("*.py")):
            rel = path.relative_to(root).as_posix()
            for dep in sorted(direct_imports(rel)):
                top = dep.split("/")[0]
                if top != package and top not in allowed:
                    found.append(f"{rel} imports {dep}")
                elif top == package == "tasks" and not dep.endswith("__init__.py"):
                    found.append(f"{rel} imports {dep} (a task module imports only headstart/)")
    return found


def test_layers_only_point_down() -> None:
    assert layer_violations() == []


def test_the_layer_check_sees_an_upward_and_a_sideways_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for package in LAYERS:
        shutil.copytree(PROJECT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "headstart" / "config.py").write_text(
        (PROJECT / "headstart" / "config.py").read_text() + "\n\ndef _late():\n    from tasks.train import train\n"
    )
    (tmp_path / "tasks" / "evaluate.py").write_text(
        (PROJECT / "tasks" / "evaluate.py").read_text() + "\nfrom tasks.train import recipe_of\n"
    )
    monkeypatch.setattr(codeversion, "PROJECT", tmp_path)
    found = layer_violations(tmp_path)
    assert "headstart/config.py imports tasks/train.py" in found
    assert any(v.startswith("tasks/evaluate.py imports tasks/train.py") for v in found)


def test_the_import_closure_follows_lazy_imports_and_packages() -> None:
    closure = import_closure("tasks/extract.py")
    assert "headstart/dask_extract.py" in closure, "imported inside a function, still code the stage runs"
    assert {"headstart/checkpoints.py", "headstart/sources.py", "headstart/fingerprint.py"} <= set(closure)
    assert "tasks/train.py" not in closure and not any(p.startswith("flows/") for p in closure)


def test_the_store_key_covers_every_file_that_decides_an_activation() -> None:
    core = set(stage_code("headstart/extraction.py"))
    # the files issue 11 found missing from the hand-written list: a change there served old features
    assert {
        "headstart/checkpoints.py",
        "headstart/sources.py",
        "headstart/fingerprint.py",
        "headstart/store.py",
    } <= core
    assert "headstart/dask_extract.py" not in core, "how rows are scheduled must not change which store they are in"


def test_a_code_version_changes_with_any_file_of_the_closure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for package in ("headstart", "tasks"):
        shutil.copytree(PROJECT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codeversion, "PROJECT", tmp_path)
    monkeypatch.setattr("headstart.fingerprint._PROJECT", tmp_path)
    for cached in (codeversion.import_closure, codeversion.code_version):
        cached.cache_clear()
    try:
        before = codeversion.code_version("tasks/train.py"), codeversion.code_version("tasks/data.py")
        (tmp_path / "headstart" / "strategies.py").write_text(
            (tmp_path / "headstart" / "strategies.py").read_text() + "\n# a helper only training uses\n"
        )
        codeversion.code_version.cache_clear()
        after = codeversion.code_version("tasks/train.py"), codeversion.code_version("tasks/data.py")
    finally:
        for cached in (codeversion.import_closure, codeversion.code_version):
            cached.cache_clear()
    assert after[0] != before[0], "train imports strategies: its code version must change"
    assert after[1] == before[1], "data does not: its code version must not"


def _committed(name: str) -> dict:
    return yaml.safe_load((PROJECT / name).read_text())


@pytest.mark.parametrize(
    ("name", "build"), [("dvc.yaml", dvcyaml.pipeline), ("sweep/dvc.yaml", dvcyaml.sweep_pipeline)]
)
def test_dvc_yaml_is_what_the_code_says(name: str, build) -> None:
    assert (PROJECT / name).read_text() == dvcyaml.render(build()), f"{name} is stale: run `headstart dvc-yaml`"


def _deps(stage: dict) -> list[str]:
    return (stage.get("do") or stage)["deps"]


def test_every_stage_depends_on_every_file_its_task_imports() -> None:
    stages = _committed("dvc.yaml")["stages"]
    for name, stage in stages.items():
        missing = set(stage_code(f"tasks/{name}.py")) - set(_deps(stage))
        assert not missing, f"dvc.yaml stage {name!r} misses code its task runs: {sorted(missing)}"
        extra = {d for d in _deps(stage) if d.endswith(".py")} - set(stage_code(f"tasks/{name}.py"))
        assert not extra, f"dvc.yaml stage {name!r} lists code its task does not import: {sorted(extra)}"


def test_the_deps_check_fails_on_a_stage_that_misses_a_helper() -> None:
    broken = dvcyaml.pipeline()
    broken["stages"]["evaluate"]["do"]["deps"].remove("headstart/extraction.py")
    missing = set(stage_code("tasks/evaluate.py")) - set(_deps(broken["stages"]["evaluate"]))
    assert missing == {"headstart/extraction.py"}
    assert dvcyaml.render(broken) != (PROJECT / "dvc.yaml").read_text()


def test_stage_params_name_sections_the_params_define() -> None:
    params = load_params(PROJECT / "params.yaml")
    fields = set(Params.model_fields)
    for name, stage in _committed("dvc.yaml")["stages"].items():
        for section in (stage.get("do") or stage)["params"]:
            top = section.split(".")[0]
            assert top in fields, f"stage {name!r} reads params section {section!r}, not in params.yaml's model"
    assert params.sources and params.train.runs


def test_outs_are_the_paths_the_stages_write(tmp_path: Path) -> None:
    """The records each stage writes (flows.layout) are its outs: the same Layout renders both."""
    from flows.layout import Layout

    lay = Layout(Path("."))
    outs = {
        name: [next(iter(o)) if isinstance(o, dict) else o for o in (s.get("do") or s).get("outs", [])]
        + [next(iter(m)) for m in (s.get("do") or s).get("metrics", [])]
        + [next(iter(p)) if isinstance(p, dict) else p for p in (s.get("do") or s).get("plots", [])]
        for name, s in _committed("dvc.yaml")["stages"].items()
    }
    assert lay.raw_record.as_posix() in outs["raw"]
    assert lay.data_record.as_posix() in outs["data"]
    assert (lay.source_model / "record.json").as_posix() in outs["pretrain"]
    assert lay.weights.as_posix() in outs["weights"]
    assert lay.extract_record("${key}").as_posix() in outs["extract"]
    assert lay.advice_record("${key}").as_posix() in outs["advise"]
    assert lay.train_record("${key}").as_posix() in outs["train"]
    assert lay.evaluate_record("${key}").as_posix() in outs["evaluate"]
    plots = {name: (s.get("do") or s).get("plots", []) for name, s in _committed("dvc.yaml")["stages"].items()}
    history = (lay.run_model("${key}") / "history.json").as_posix()
    assert plots["train"] == [{history: {"x": "epoch", "y": "val_accuracy"}}]  # the training curves, for dvc plots
    assert (lay.reports / "${key}" / "confusion.png").as_posix() in plots["evaluate"]
    assert "sweep" not in outs, "a plain `dvc repro` runs the pipeline, not the sweep"


def test_the_stages_a_prefect_run_commits_are_named_as_in_dvc_yaml() -> None:
    from flows.stages import dvc_stage
    from headstart.backbones import Preprocess
    from headstart.records import SourceWeights

    weights = SourceWeights(
        source="fmnist", uri="u", path="p", sha256="0" * 64, arch="fmnist_cnn", cut="block2",
        preprocess=Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,)),
    )  # fmt: skip
    stages = _committed("dvc.yaml")["stages"]
    assert dvc_stage("data", {}) == "data" and "data" in stages
    assert (
        dvc_stage("extract", {"weights": weights}) == "extract@fmnist" and stages["extract"]["foreach"] == "${sources}"
    )
    assert dvc_stage("advise", {"weights": weights}) == "advise@fmnist" and stages["advise"]["foreach"] == "${sources}"
    assert dvc_stage("train", {"run_name": "fmnist-frozen", "weights": weights}) == "train@fmnist-frozen"
    assert stages["train"]["foreach"] == stages["evaluate"]["foreach"] == "${train.runs}"
