"""The CLI through typer's CliRunner: listings, train/evaluate, and every bad input -> exit 2, one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fpt_deploy.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(args))


def test_listings():
    r = _run("backbones")
    assert r.exit_code == 0 and "minilm" in r.output and "gpt2" in r.output
    r = _run("tasks")
    assert r.exit_code == 0 and "bit-memory" in r.output and "patch=50" in r.output


def test_help_names_the_commands():
    r = _run("--help")
    for cmd in ("train", "evaluate", "backbones", "tasks"):
        assert cmd in r.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = _run(
        "train",
        "--task",
        "bit-xor",
        "--backbone",
        "tiny-bert",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "-o",
        "train_size=32",
        "-o",
        "test_size=16",
        "--out",
        str(out),
    )
    assert r.exit_code == 0, r.output
    assert "best " in r.output and "accuracy" in r.output and "trainable" in r.output
    return out


def test_train_then_evaluate(run_dir):
    r = _run("evaluate", "--checkpoint", str(run_dir))
    assert r.exit_code == 0, r.output
    assert "bit-xor: test accuracy" in r.output


def _assert_clean_error(r, *fragments):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("error:") and sum("error" in line for line in lines) == 1
    for f in fragments:
        assert f in r.output


def test_unknown_task_and_backbone():
    _assert_clean_error(_run("train", "--task", "nope"), "unknown task 'nope'")
    _assert_clean_error(_run("train", "--task", "bit-xor", "--backbone", "nope"), "unknown backbone 'nope'")


def test_missing_data():
    _assert_clean_error(_run("train", "--task", "cifar10", "--backbone", "tiny-bert"), "--data-dir")


def test_bad_settings_are_listed_together():
    _assert_clean_error(
        _run("train", "--task", "bit-xor", "--batch-size", "0", "--lr", "-1"), "batch size", "lr must be"
    )


def test_missing_and_corrupt_checkpoints(tmp_path, run_dir):
    _assert_clean_error(_run("evaluate", "--checkpoint", str(tmp_path)), "not a checkpoint")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    _assert_clean_error(_run("evaluate", "--checkpoint", str(bad)), "corrupt")
    (bad / "config.json").write_text(json.dumps({"format": "something-else"}))
    _assert_clean_error(_run("evaluate", "--checkpoint", str(bad)), "not an fpt-deploy checkpoint")
    config = json.loads((run_dir / "best" / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "trainable.safetensors").write_bytes(b"\x00" * 10)
    _assert_clean_error(_run("evaluate", "--checkpoint", str(bad)), "corrupt")


def test_checkpoint_from_another_body(tmp_path, run_dir):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    config = json.loads((run_dir / "best" / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "fingerprint": "0" * 64}))
    (foreign / "trainable.safetensors").write_bytes((run_dir / "best" / "trainable.safetensors").read_bytes())
    _assert_clean_error(_run("evaluate", "--checkpoint", str(foreign)), "fingerprint")


def test_version_comes_from_the_installed_package():
    from importlib.metadata import version

    r = _run("--version")
    assert r.exit_code == 0 and r.output.strip() == f"fpt-deploy {version('fpt-deploy')}"
