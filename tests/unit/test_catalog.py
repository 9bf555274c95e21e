"""`headstart backbones`: cut points with their activation shapes, and local weights checked by their hash prefix."""

from __future__ import annotations

import hashlib

from typer.testing import CliRunner

from flows.catalog import cut_shapes, local_weights


def test_cut_points_come_with_their_shapes_and_fixed_size_models_use_their_own_size():
    size, shapes = cut_shapes("resnet18", 64)
    assert size == 64 and shapes["layer4"] == (512, 2, 2) and shapes["pool"] == (512,)
    size, shapes = cut_shapes("fmnist_cnn", 64)  # its flatten fixes the input at 28 px
    assert size == 28 and shapes["block2"] == (64, 7, 7)
    assert cut_shapes("timm:resnet18", 32)[1] == {"penultimate": (512,)}


def test_local_weights_are_verified_against_the_hash_in_their_name(tmp_path):
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    good = b"weights"
    (folder / f"net-{hashlib.sha256(good).hexdigest()[:8]}.pth").write_bytes(good)
    (folder / "other-00000000.pth").write_bytes(b"tampered")
    assert local_weights(tmp_path) == {
        f"net-{hashlib.sha256(good).hexdigest()[:8]}.pth": True,
        "other-00000000.pth": False,
    }


def test_the_command_lists_one_model_or_refuses_an_unknown_one():
    from flows.cli import app

    out = CliRunner().invoke(app, ["backbones", "--model", "shufflenet_v2_x0_5", "--image-size", "32"])
    assert out.exit_code == 0 and "penultimate    1024" in out.output
    bad = CliRunner().invoke(app, ["backbones", "--model", "nosuch"])
    assert bad.exit_code == 2 and "unknown architecture 'nosuch'" in bad.output
