"""The weights stage: URI forms, verified downloads from a real local HTTP server, torchvision's cache, the registry."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import sqlite3
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision

from headstart import registry_db
from headstart import sources as sources_mod
from headstart.backbones import IMAGENET_MEAN, IMAGENET_STD, StagedNet, create_model
from headstart.checkpoints import CheckpointError, ModelSpec, save_model
from headstart.config import SourceParams, WeightsParams
from headstart.download import DownloadError
from headstart.env import project_root
from headstart.fingerprint import ChecksumError, sha256_bytes, sha256_file
from headstart.images import Preprocess
from headstart.records import SourceWeights, WeightsRecord
from headstart.sources import fetch, load_source, torchvision_weights
from headstart.uris import WEIGHTS_SHA_TAG, content_pin, parse_uri
from tasks.weights import check_source, weights

REAL_MOBILENET = Path(__file__).resolve().parents[2] / ".torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
FAST = WeightsParams(retries=3, timeout_s=5)
SPEC_MEAN, SPEC_STD = (0.25,), (0.35,)


# --- a real HTTP server on 127.0.0.1 ------------------------------------------------------------


class Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.failures = 0
        """How many of the next requests are answered 503."""
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                if server.failures > 0:
                    server.failures -= 1
                    self.send_error(503, "busy")
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


SPEC = ModelSpec(
    arch="fmnist_cnn",
    num_classes=5,
    class_names=[f"c{i}" for i in range(5)],
    preprocess=Preprocess(image_size=28, channels=1, mean=SPEC_MEAN, std=SPEC_STD),
)


def headstart_model(path: Path, seed: int = 0) -> tuple[StagedNet, str]:
    """A source model as pretrain writes it: safetensors with its spec (non-default mean/std) in the metadata."""
    torch.manual_seed(seed)
    net = create_model("fmnist_cnn", SPEC.num_classes)
    return net, save_model(net, SPEC, path)


def fmnist_source(weights_uri: str, sha256: str | None = None, cut: str = "block2") -> SourceParams:
    return SourceParams(weights=weights_uri, sha256=sha256, arch="fmnist_cnn", cut=cut)


def same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: str = "stages.classifier.") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


# --- URI forms ----------------------------------------------------------------------------------


def test_parse_uri_recognises_every_form() -> None:
    assert parse_uri("models/source/model.safetensors") == sources_mod.WeightsURI(
        "path", "models/source/model.safetensors"
    )
    assert parse_uri("/abs/w.pth").kind == "path"
    assert parse_uri("https://example.org/w/resnet.pth") == sources_mod.WeightsURI(
        "url", "https://example.org/w/resnet.pth"
    )
    assert parse_uri("http://127.0.0.1:8000/w.pth").kind == "url"
    assert parse_uri("torchvision:mobilenet_v2/IMAGENET1K_V1") == sources_mod.WeightsURI(
        "torchvision", "mobilenet_v2", member="IMAGENET1K_V1"
    )
    assert parse_uri("models:/fmnist-source@champion") == sources_mod.WeightsURI(
        "registry", "fmnist-source", member="champion"
    )
    assert parse_uri("models:/fmnist-source/3") == sources_mod.WeightsURI("registry", "fmnist-source", version="3")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty weights URI"),
        ("ftp://example.org/w.pth", "unsupported scheme 'ftp'"),
        ("s3://bucket/w.pth", "unsupported scheme 's3'"),
        ("http://example.org/w.pth", "plain http is accepted only for 127.0.0.1"),
        ("https://example.org/", "must name a host and a file"),
        ("torchvision:resnet18", r"expected torchvision:<model>/<WEIGHTS_ENUM>"),
        ("torchvision:resnet18/IMAGENET1K_V1/x", r"expected torchvision:<model>/<WEIGHTS_ENUM>"),
        ("models:/fmnist-source", r"expected models:/<name>@<alias> or models:/<name>/<version>"),
        ("models:/fmnist-source@", r"expected models:/<name>@<alias>"),
        ("models:/fmnist-source/latest", r"expected models:/<name>@<alias>"),
    ],
)
def test_parse_uri_refuses_bad_forms(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_uri(uri)
    if uri:
        assert repr(uri) in str(err.value)


def test_torchvision_names_are_checked_with_the_valid_choices() -> None:
    assert torchvision_weights("mobilenet_v2", "IMAGENET1K_V1").url.endswith("mobilenet_v2-b0353104.pth")
    with pytest.raises(ValueError, match="unknown torchvision model 'mobilenet_v9'.*'resnet18'"):
        torchvision_weights("mobilenet_v9", "IMAGENET1K_V1")
    with pytest.raises(ValueError, match="has no member 'IMAGENET1K_V7'.*'IMAGENET1K_V1', 'IMAGENET1K_V2'"):
        torchvision_weights("mobilenet_v2", "IMAGENET1K_V7")


def test_wrong_arch_or_cut_is_refused_listing_valid_values() -> None:
    with pytest.raises(ValueError, match=r"sources.s.cut is 'block9'; fmnist_cnn has the cut points.*'block1'"):
        check_source("s", fmnist_source("w.safetensors", cut="block9"))
    with pytest.raises(ValueError, match="cut points.*'block2', 'fc1'"):  # the classifier is not a cut point
        check_source("s", fmnist_source("w.safetensors", cut="classifier"))
    bad_arch = SourceParams(weights="w.pth", arch="vgg99", cut="pool")
    with pytest.raises(ValueError, match=r"unknown architecture 'vgg99'.*'fmnist_cnn'.*'resnet18'"):
        check_source("s", bad_arch)
    mismatch = SourceParams(weights="torchvision:resnet18/IMAGENET1K_V1", arch="mobilenet_v2", cut="pool")
    with pytest.raises(ValueError, match="are for 'resnet18', but arch is 'mobilenet_v2'"):
        check_source("s", mismatch)
    # refused before anything is fetched: the wrapper checks every source first
    with pytest.raises(ValueError, match="cut points"):
        weights.fn(
            {"s": fmnist_source("does/not/exist.safetensors", cut="nope")}, FAST, Path("/nonexistent"), Path("/x")
        )


# --- local paths ------------------------------------------------------------------------------


def test_local_path_resolves_against_the_project_root_and_reads_the_spec(tmp_path: Path) -> None:
    rel = Path("local-test") / "model.safetensors"
    _, sha = headstart_model(project_root() / rel)
    got = fetch(str(rel), None, FAST, tmp_path)
    assert got.path == project_root() / rel and got.sha256 == sha
    assert (got.mean, got.std) == (SPEC_MEAN, SPEC_STD)
    assert fetch(str(rel), sha, FAST, tmp_path).sha256 == sha
    wrong = "0" * 64
    with pytest.raises(ChecksumError, match=f"expected {wrong}, got {sha}"):
        fetch(str(rel), wrong, FAST, tmp_path)


def test_a_missing_local_file_names_the_path_and_the_stage_that_writes_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"models/nowhere/model.safetensors not found: run the pretrain stage"):
        fetch("models/nowhere/model.safetensors", None, FAST, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"elsewhere.pth not found$"):
        fetch(str(tmp_path / "elsewhere.pth"), None, FAST, tmp_path)


def test_the_cache_key_follows_a_local_file_rewritten_in_place(tmp_path: Path) -> None:
    rel = "local-key/model.safetensors"
    headstart_model(project_root() / rel, seed=1)
    call = {"sources": {"s": fmnist_source(rel)}, "params": FAST, "out_dir": tmp_path, "cache_dir": tmp_path / "c"}
    first = weights.cache_key_fn(None, call)
    assert weights.cache_key_fn(None, call) == first
    headstart_model(project_root() / rel, seed=2)  # pretrain reran: same URI, other bytes
    assert weights.cache_key_fn(None, call) != first


class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"stages.block1.0.weight": torch.zeros(32, 1, 3, 3), "x": Payload(marker)}, path)
    assert not marker.exists()
    out = weights.fn({"evil": fmnist_source(str(path))}, FAST, tmp_path / "records", tmp_path / "cache")
    record = out.sources["evil"]
    assert record.sha256 == sha256_file(path)
    with pytest.raises(CheckpointError, match="refused: not a weights-only checkpoint"):
        load_source(record)
    assert not marker.exists()


def test_load_source_verifies_the_full_sha256_on_every_load(tmp_path: Path) -> None:
    net, _ = headstart_model(tmp_path / "m.safetensors")
    out = weights.fn({"s": fmnist_source(str(tmp_path / "m.safetensors"))}, FAST, tmp_path / "r", tmp_path / "c")
    record = out.sources["s"]
    assert same_weights(load_source(record), net, skip="-")
    with open(record.local(), "r+b") as f:  # flip one byte of a tensor
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        load_source(record)


def test_a_staged_checkpoint_without_a_spec_keeps_its_classifier_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_model("fmnist_cnn", 7)
    torch.save(net.state_dict(), tmp_path / "staged.pth")
    out = weights.fn({"s": fmnist_source(str(tmp_path / "staged.pth"))}, FAST, tmp_path / "r", tmp_path / "c")
    assert out.sources["s"].preprocess.mean == (0.5,)  # no spec: the architecture's defaults
    loaded = load_source(out.sources["s"])
    assert loaded.stages["classifier"].out_features == 7 and same_weights(loaded, net, skip="-")


# --- https (a real server on 127.0.0.1) -----------------------------------------------------------


def test_a_download_is_verified_cached_recorded_and_reused(server: Server, tmp_path: Path) -> None:
    net, _ = headstart_model(tmp_path / "src.safetensors")
    body = (tmp_path / "src.safetensors").read_bytes()
    sha = sha256_bytes(body)
    server.files["/w/model.safetensors"] = body
    source = fmnist_source(server.url("/w/model.safetensors"), sha)
    cache, out_dir = tmp_path / "cache", tmp_path / "records"

    out = weights.fn({"remote": source}, FAST, out_dir, cache)

    record = out.sources["remote"]
    # outside the project, a record's path is absolute (inside, it would be project-relative)
    assert record.path == str((cache / sha / "model.safetensors").resolve())
    assert record.local() == (cache / sha / "model.safetensors").resolve()
    assert record.sha256 == sha and record.arch == "fmnist_cnn" and record.cut == "block2"
    assert record.source == "remote" and record.uri == source.weights
    assert record.preprocess.model_dump(mode="json") == {
        "image_size": 28,
        "channels": 1,
        "mean": list(SPEC_MEAN),
        "std": list(SPEC_STD),
    }
    assert json.loads((out_dir / "remote.json").read_text()) == record.model_dump(mode="json")
    assert SourceWeights.read(out_dir / "remote.json") == record
    assert {o.path for o in out.outputs} == {str((out_dir / "remote.json").resolve()), record.path}
    assert out.intact()
    assert files_under(cache) == [cache / sha / "model.safetensors"]
    assert same_weights(load_source(record), net, skip="-")
    again = weights.fn({"remote": source}, FAST, out_dir, cache)
    assert isinstance(again, WeightsRecord) and again.sources == out.sources
    assert server.requests == ["/w/model.safetensors"]  # the verified cached file was reused


def test_a_wrong_pinned_sha256_fails_at_once_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    server.files["/w.pth"] = b"not the pinned bytes"
    pinned, actual = "a" * 64, sha256_bytes(b"not the pinned bytes")
    url = server.url("/w.pth")
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError) as err:
        fetch(url, pinned, FAST, cache)
    assert url in str(err.value) and pinned in str(err.value) and actual in str(err.value)
    assert server.requests == ["/w.pth"]  # a checksum mismatch is never retried
    assert files_under(cache) == [] and list(cache.iterdir()) == []


def test_server_errors_are_retried_with_backoff(server: Server, tmp_path: Path) -> None:
    server.files["/w.pth"] = b"weights"
    sha = sha256_bytes(b"weights")
    server.failures = 2
    got = fetch(server.url("/w.pth"), sha, FAST, tmp_path / "cache")
    assert got.sha256 == sha and got.path.read_bytes() == b"weights"
    assert len(server.requests) == 3

    server.failures, server.requests = 2, []
    with pytest.raises(DownloadError, match=r"w2.pth: giving up after 2 attempt\(s\): HTTP 503"):
        fetch(server.url("/w2.pth"), sha, WeightsParams(retries=1), tmp_path / "cache2")
    assert len(server.requests) == 2
    assert files_under(tmp_path / "cache2") == []


def test_client_errors_and_refused_connections_give_clear_errors(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(server.url("/missing.pth"), "b" * 64, FAST, tmp_path)
    assert len(server.requests) == 1  # 4xx is not retried
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.pth"
    with pytest.raises(DownloadError, match=rf"{url}: giving up after 2 attempt\(s\): .*refused"):
        fetch(url, "b" * 64, WeightsParams(retries=1), tmp_path)


def test_a_tampered_cached_file_is_rechecked_and_fetched_again(server: Server, tmp_path: Path) -> None:
    server.files["/w.pth"] = b"good weights"
    sha = sha256_bytes(b"good weights")
    first = fetch(server.url("/w.pth"), sha, FAST, tmp_path)
    first.path.write_bytes(b"evil weights")
    again = fetch(server.url("/w.pth"), sha, FAST, tmp_path)
    assert again.path == first.path and again.path.read_bytes() == b"good weights"
    assert len(server.requests) == 2


# --- torchvision --------------------------------------------------------------------------------


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    return hub


def test_torchvision_weights_from_a_prefilled_hub_cache(torch_home: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    name = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    torch.save(state, torch_home / name)
    sha = sha256_file(torch_home / name)
    source = SourceParams(weights="torchvision:resnet18/IMAGENET1K_V1", sha256=sha, arch="resnet18", cut="layer3")

    record = weights.fn({"tv": source}, FAST, tmp_path / "r", tmp_path / "c").sources["tv"]

    assert record.path == str(torch_home / name) and record.sha256 == sha
    assert record.preprocess.model_dump(mode="json") == {
        "image_size": 224,  # no image_size in params: the weights' own crop size (their transforms')
        "channels": 3,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    net = load_source(record)
    assert torch.equal(net.stages["layer1"][0].conv1.weight, state["layer1.0.conv1.weight"])
    assert torch.equal(net.stages["stem"][0].weight, state["conv1.weight"])

    # unpinned: no full hash is known for it, and the generated file cannot match the name's prefix
    unpinned = SourceParams(weights=source.weights, arch="resnet18", cut="layer3")
    with pytest.raises(ChecksumError, match=rf"{sha} does not match f37072fd"):
        weights.fn({"tv": unpinned}, FAST, tmp_path / "r", tmp_path / "c")
    assert (torch_home / name).is_file()  # the user's cache is left alone


@pytest.fixture
def real_mobilenet(torch_home: Path) -> Path:
    if not REAL_MOBILENET.is_file():
        pytest.skip(f"the real MobileNetV2 weights are not at {REAL_MOBILENET}")
    shutil.copy(REAL_MOBILENET, torch_home / REAL_MOBILENET.name)
    return torch_home / REAL_MOBILENET.name


MOBILENET = SourceParams(
    weights="torchvision:mobilenet_v2/IMAGENET1K_V1", arch="mobilenet_v2", cut="pool", image_size=64
)


def test_real_mobilenet_is_verified_by_the_known_hash_and_loads(real_mobilenet: Path) -> None:
    got = fetch(MOBILENET.weights, None, FAST, real_mobilenet.parent)
    assert got.sha256 == sources_mod.KNOWN_SHA256["mobilenet_v2/IMAGENET1K_V1"] == sha256_file(real_mobilenet)
    record = weights.fn({"imagenet": MOBILENET}, FAST, real_mobilenet.parent / "r", real_mobilenet.parent / "c")
    net = load_source(record.sources["imagenet"])
    native = torch.load(real_mobilenet, weights_only=True)
    assert net.cut_names[-1] == "pool"
    assert torch.equal(net.stages["features_0"][0].weight, native["features.0.0.weight"])
    assert torch.equal(net.stages["features_18"][0].weight, native["features.18.0.weight"])


def test_unknown_torchvision_weights_are_trusted_on_first_use_by_their_name_prefix(
    real_mobilenet: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delitem(sources_mod.KNOWN_SHA256, "mobilenet_v2/IMAGENET1K_V1")
    with caplog.at_level(logging.WARNING, logger="headstart"):
        got = fetch(MOBILENET.weights, None, FAST, real_mobilenet.parent)
    assert got.sha256 == hashlib.sha256(real_mobilenet.read_bytes()).hexdigest()
    assert "trust on first use" in caplog.text and got.sha256 in caplog.text


# --- the MLflow registry ------------------------------------------------------------------------


def register(name: str, folder: Path, seed: int) -> tuple[StagedNet, str]:
    from headstart import tracking

    path = folder / f"model-{seed}.safetensors"
    net, sha = headstart_model(path, seed=seed)
    with tracking.training_run(f"weights-test-{seed}", {"arch": "fmnist_cnn"}, {}):
        tracking.log_model(path, sha, SPEC, register_as=name)
    return net, sha


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[StagedNet, str]:
    return register("weights-test-source", tmp_path_factory.mktemp("registry"), seed=3)


@pytest.mark.parametrize("uri", ["models:/weights-test-source@champion", "models:/weights-test-source/1"])
def test_registry_models_are_fetched_verified_and_loaded(
    registered: tuple[StagedNet, str], uri: str, tmp_path: Path
) -> None:
    net, sha = registered
    record = weights.fn({"reg": fmnist_source(uri)}, FAST, tmp_path / "r", tmp_path / "c").sources["reg"]
    assert record.sha256 == sha and record.path.startswith(str(tmp_path / "c" / sha))
    assert (record.preprocess.mean, record.preprocess.std) == (SPEC_MEAN, SPEC_STD)
    assert files_under(tmp_path / "c") == [record.local()]  # the other artifacts were not kept
    assert same_weights(load_source(record), net, skip="-")


def test_registry_errors(registered: tuple[StagedNet, str], tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="models:/weights-test-source@nope: not in the MLflow registry"):
        fetch("models:/weights-test-source@nope", None, FAST, tmp_path)
    with pytest.raises(ChecksumError, match=f"pinned sha256 {'c' * 64}, registry tag says {registered[1]}"):
        fetch("models:/weights-test-source/1", "c" * 64, FAST, tmp_path)


def test_the_cache_key_follows_a_moved_alias(tmp_path: Path) -> None:
    _, sha1 = register("weights-test-moving", tmp_path, seed=4)
    call = {
        "sources": {"s": fmnist_source("models:/weights-test-moving@champion")},
        "params": FAST,
        "out_dir": tmp_path,
    }
    first = weights.cache_key_fn(None, call)
    _, sha2 = register("weights-test-moving", tmp_path, seed=5)  # a new champion: same URI, other weights
    assert content_pin("models:/weights-test-moving@champion", None).endswith(sha2) and sha1 != sha2
    assert weights.cache_key_fn(None, call) != first


def client_answer(name: str, alias: str | None, version: str | None) -> tuple[str, str, str | None]:
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return found.name, str(found.version), found.tags.get(WEIGHTS_SHA_TAG)


def db_answer(name: str, alias: str | None, version: str | None) -> tuple[str, str, str | None] | None:
    found = registry_db.lookup(name, alias, version)
    return None if found is None else (found.name, found.version, found.tags.get(WEIGHTS_SHA_TAG))


def test_the_sqlite_registry_read_agrees_with_mlflow_and_defers_to_it_otherwise(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    register("weights-test-db", tmp_path, seed=6)
    register("weights-test-db", tmp_path, seed=7)  # version 2
    client = MlflowClient()
    client.set_registered_model_alias("weights-test-db", "champion", "2")
    for alias, version in [("champion", None), (None, "1"), (None, "2")]:
        assert db_answer("weights-test-db", alias, version) == client_answer("weights-test-db", alias, version)
    client.set_registered_model_alias("weights-test-db", "champion", "1")  # the alias moved: read again
    assert db_answer("weights-test-db", "champion", None) == client_answer("weights-test-db", "champion", None)
    client.delete_model_version("weights-test-db", "2")  # deleted: MLflow keeps the row, the read must not
    assert db_answer("weights-test-db", None, "2") is None
    assert db_answer("weights-test-db", "nope", None) is None  # MLflow gives the error for a missing alias
    assert db_answer("weights-test-db", "latest", None) is None  # MLflow's special alias
    not_mlflow = tmp_path / "other.db"
    sqlite3.connect(not_mlflow).execute("CREATE TABLE t (x)").connection.commit()
    assert registry_db.lookup("weights-test-db", "champion", None, f"sqlite:///{not_mlflow}") is None
    assert registry_db.lookup("weights-test-db", "champion", None, "http://127.0.0.1:5000") is None
