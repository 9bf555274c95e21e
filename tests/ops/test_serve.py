"""The registered model served by a real `mlflow models serve` on 127.0.0.1, answering real HTTP requests.

The server runs in its own process group, started and stopped by the test; psutil checks that
none of its processes (the CLI and its uvicorn worker) outlives it.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from headstart import servers
from headstart.extraction import provenance, stored_features
from headstart.serving import predict_proba
from tests.ops.conftest import BIN, MODEL, assert_all_gone, clean_env, free_port, process_tree


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def png_base64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served(registered: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = {"MLFLOW_TRACKING_URI": registered["uri"], "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    server = servers.Server("model", command, url, f"{url}/ping", env)
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    # the server sees a user's environment, not this test session's
    running = servers.start(server, log=log, timeout_s=180, base_env=clean_env(registered["root"]))
    processes = process_tree(running.pid)
    yield {"url": url, "processes": processes, "running": running}
    running.stop()
    log.close()
    assert_all_gone(processes)


def test_raw_pixels_base64_pngs_and_a_dataframe_get_the_same_answers(served, registered: dict[str, Any]):
    images = registered["test"].images[:5]
    probs = predict_proba(registered["net"], registered["spec"], images)
    names = registered["spec"].class_names
    encoded = [png_base64(im) for im in images]
    bodies = [
        {"inputs": images.tolist()},
        {"inputs": {"images": images.tolist()}},
        {"inputs": encoded},
        {"dataframe_records": [{"image": e} for e in encoded]},
        {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}},
    ]
    for body in bodies:
        status, answer = post(f"{served['url']}/invocations", body)
        assert status == 200, answer
        rows = answer["predictions"]
        assert [r["class"] for r in rows] == [names[k] for k in probs.argmax(1)]
        np.testing.assert_allclose([r["probability"] for r in rows], probs.max(1), rtol=1e-5)


def test_stored_features_are_answered_by_the_head_alone(served, registered: dict[str, Any]):
    test = registered["test"]
    trained, spec, extracted = registered["trained"], registered["spec"], registered["setup"].extract_record
    # the model's own record and spec name the store's provenance at its cut: the features it was trained on
    own = provenance(trained.weights_sha256, spec.arch, spec.cut, spec.preprocess)
    assert extracted.provenance_for(spec.cut) == own
    features = stored_features(extracted, test.images[:5], spec.cut)
    status, answer = post(f"{served['url']}/invocations", {"inputs": {"features": features.tolist()}})
    assert status == 200, answer
    expected = predict_proba(registered["net"], spec, test.images[:5])
    np.testing.assert_allclose([r["probability"] for r in answer["predictions"]], expected.max(1), rtol=1e-4)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": [[[300]]]}, "0 to 255"),
        ({"inputs": {"pixels": [1]}}, "exactly one of 'images' or 'features'"),
        ({"inputs": {"features": [[0.0, 1.0]]}}, "activations at cut 'block2'"),
        ({"dataframe_records": [{"image": "bm90IGFuIGltYWdl"}]}, "not a readable PNG/JPEG"),
    ],
)
def test_a_malformed_request_is_a_400_that_says_why(served, body: dict, message: str):
    status, answer = post(f"{served['url']}/invocations", body)
    assert status == 400
    assert message in answer["message"]


def test_the_logged_model_holds_code_and_weights_but_no_pickle(registered: dict[str, Any]):
    client = MlflowClient(registered["uri"])
    version = client.get_model_version_by_alias(MODEL, "champion")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=tmp, tracking_uri=registered["uri"]))
        files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
        mlmodel = (local / "MLmodel").read_text()
    assert {"served_model.py", "artifacts/model.safetensors", "artifacts/model.json"} <= files
    assert not any(f.endswith((".pkl", ".pickle")) for f in files), files
    assert "model_code_path" in mlmodel
