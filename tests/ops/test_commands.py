"""What `headstart schedule` and `headstart server` refuse, before anything is started."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.ops.conftest import free_port
from tests.tiny import REPO


def invoke(*args: str, **env: str):
    return CliRunner(env=env).invoke(app, list(args))


def test_schedule_without_a_prefect_server_says_how_to_start_one():
    port = free_port()  # nothing listens there
    result = invoke("schedule", "--interval", "60", PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    assert result.exit_code == 2
    assert "scheduling needs a running Prefect server" in result.stderr
    assert "make prefect-server" in result.stderr and "PREFECT_API_URL" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "exactly one of --cron or --interval"),
        (("--cron", "0 2 * * *", "--interval", "60"), "exactly one of --cron or --interval"),
        (("--cron", "every night"), "not a cron expression"),
    ],
)
def test_schedule_needs_exactly_one_valid_schedule(args: tuple[str, ...], message: str):
    result = invoke("schedule", *args)
    assert result.exit_code == 2
    assert message in result.output


def test_server_kind_is_checked():
    result = invoke("server", "redis")
    assert result.exit_code == 2
    assert "expected prefect or mlflow" in result.output


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_port_already_serving_is_refused_before_starting_anything():
    httpd = HTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        result = invoke("server", "mlflow", "--port", str(httpd.server_address[1]))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert result.exit_code == 1
    assert "something already answers" in result.stderr


def test_a_stage_refusing_its_input_says_so_in_one_line(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["root"] = str(tmp_path / "no-such-data")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    result = invoke("stage", "raw", "--params", str(params))
    assert result.exit_code == 1
    missing = tmp_path / "no-such-data"
    assert result.stderr.strip().splitlines() == [
        f"error: {missing}: data.root lacks the Fashion-MNIST IDX files (train/t10k images and labels)"
    ]
