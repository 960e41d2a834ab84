"""Data-parallel training under torchrun: 2 CPU ranks with gloo equal one process; launcher errors."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fpt_deploy.training.distributed import LaunchError, World, init_world, read_launcher_env, shard
from safetensors.torch import load_file
from typer.testing import CliRunner

from fpt_deploy.cli import app
from fpt_deploy.errors import ConfigError, FptDeployError

# 61 examples in global batches of 15: an epoch is 15, 15, 15, 15, 1. Two ranks split 15 as 8 + 7 (uneven
# shares) and the tail batch of 1 leaves rank 1 a zero-weight sample: both paths must still match.
ARGS = [
    "train",
    "--task",
    "bit-xor",
    "-b",
    "tiny-bert",
    "-o",
    "train_size=61",
    "-o",
    "test_size=32",
    "--batch-size",
    "15",
    "--eval-every",
    "5",
    "--device",
    "cpu",
    "--schedule",  # runs stopped at 5 and resumed to 10 steps: a constant lr keeps them one schedule
    "constant",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` console script, by module
LAUNCHER_KEYS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "GROUP_RANK",
)


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_KEYS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _torchrun(out: Path, steps: int, *more: str) -> subprocess.CompletedProcess:
    cmd = [
        *TORCHRUN,
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "fpt_deploy.cli",
        *ARGS,
        "--steps",
        str(steps),
        "--out",
        str(out),
        *more,
    ]
    done = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _single(out: Path, steps: int, *more: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fpt_deploy.cli", *ARGS, "--steps", str(steps), "--out", str(out), *more],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "trainable.safetensors"))


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """10 steps (two epochs) in one process, and the same under torchrun with 2 gloo ranks, stopped after
    5 steps and resumed: one launch pair checks both that ranks equal one process and that resuming does."""
    root = tmp_path_factory.mktemp("dist")
    _single(root / "single", 10)
    _torchrun(root / "two", 5)
    stopped = torch.load(root / "two" / "last" / "trainer_state.pt", weights_only=False)["step"]
    done = _torchrun(root / "two", 10, "--resume")
    return {"root": root, "single": root / "single", "two": root / "two", "two_log": done, "stopped": stopped}


def test_two_gloo_ranks_stopped_and_resumed_equal_one_process(runs):
    assert runs["stopped"] == 5
    single, two = _tensors(runs["single"]), _tensors(runs["two"])
    _assert_close(single, two)
    initial = load_file(str(runs["single"] / "best" / "trainable.safetensors"))
    assert any(not torch.equal(initial[k], single[k]) for k in single)  # the tensors did move


def test_only_rank_zero_reports(runs):
    out = runs["two_log"].stdout
    assert sum("best" in line and "accuracy" in line for line in out.splitlines()) == 1, out
    assert runs["two_log"].stderr.count("step 10: ") == 1


def test_a_two_rank_run_resumes_in_one_process(runs):
    """The global batch does not depend on the world size, so a run may resume on fewer ranks."""
    moved = runs["root"] / "moved"
    shutil.copytree(runs["two"], moved)
    _single(moved, 15, "--resume")
    _single(runs["root"] / "single15", 15)
    _assert_close(_tensors(runs["root"] / "single15"), _tensors(moved))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_started_with_different_settings_refuse_to_train(tmp_path):
    port = str(_free_port())
    procs = []
    for rank, lr in ((0, "1e-3"), (1, "2e-3")):
        env = _clean_env(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        cmd = [sys.executable, "-m", "fpt_deploy.cli", *ARGS, "--steps", "2", "--lr", lr, "--out", str(tmp_path)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], results
    assert "rank" in results[0][1] and "differ from rank 0" in results[0][1]
    assert not (tmp_path / "last").exists()


# ---- the launcher's environment -----------------------------------------------------------------------

RENDEZVOUS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),  # no launcher: a plain process
        ({"WORLD_SIZE": "1"}, None),  # a world of one without a rendezvous is a plain process too
        ({"WORLD_SIZE": "1", "RANK": "0", **RENDEZVOUS}, (0, 1, 0)),  # torchrun --nproc-per-node 1
        ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", **RENDEZVOUS}, (3, 4, 1)),
        ({"WORLD_SIZE": "2", "RANK": "1", **RENDEZVOUS}, (1, 2, 1)),  # LOCAL_RANK defaults to RANK
    ],
)
def test_launcher_env_is_read(env, expected):
    assert read_launcher_env(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "no rendezvous \\(MASTER_ADDR and MASTER_PORT unset\\).*torchrun"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h"}, "MASTER_PORT unset"),
        ({"RANK": "0", **RENDEZVOUS}, "WORLD_SIZE is not"),
        ({"WORLD_SIZE": "two", "RANK": "0", **RENDEZVOUS}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "2", **RENDEZVOUS}, "RANK must be in 0..1"),
        ({"WORLD_SIZE": "0", **RENDEZVOUS}, "WORLD_SIZE must be >= 1"),
    ],
)
def test_launcher_misconfiguration_is_a_typed_error(env, message):
    with pytest.raises(LaunchError, match=message) as caught:
        read_launcher_env(env)
    assert isinstance(caught.value, ConfigError) and isinstance(caught.value, FptDeployError)


def test_cli_exits_2_on_a_world_without_rendezvous(monkeypatch, tmp_path):
    for key in LAUNCHER_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(app, [*ARGS, "--steps", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "no rendezvous" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cuda"], "no CUDA GPU is visible"),
        (["--dist-backend", "nccl"], "NCCL backend was asked for, but no CUDA GPU"),
    ],
)
def test_cli_exits_2_when_a_gpu_is_asked_for_without_one(monkeypatch, tmp_path, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key in LAUNCHER_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    result = CliRunner().invoke(app, [*ARGS[:-2], *args, "--steps", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_more_ranks_per_node_than_gpus_is_a_typed_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3", **RENDEZVOUS}
    with pytest.raises(LaunchError, match="LOCAL_RANK=3 needs GPU 3, but only 2 GPU"):
        init_world("cuda", "auto", env)


def test_nccl_with_cpu_device_is_a_typed_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(LaunchError, match="NCCL backend needs --device cuda"):
        init_world("cpu", "nccl", {"WORLD_SIZE": "2", "RANK": "0", **RENDEZVOUS})


def test_without_a_launcher_nothing_distributed_happens():
    world = init_world("cpu", "auto", {})
    assert world == World() and not world.distributed and world.is_main


@pytest.mark.parametrize(
    ("size", "rank", "batch", "expected", "weight"),
    [
        (1, 0, [5, 6, 7], [5, 6, 7], 1.0),
        (2, 0, [5, 6, 7], [5, 7], 2 * 2 / 3),  # uneven shares weigh by size
        (2, 1, [5, 6, 7], [6], 2 * 1 / 3),
        (2, 1, [9], [9], 0.0),  # tail batch smaller than the world: a zero-weight sample
    ],
)
def test_shard_splits_a_global_batch(size, rank, batch, expected, weight):
    local, w = shard(torch.tensor(batch), World(rank=rank, size=size))
    assert local.tolist() == expected
    assert w == pytest.approx(weight)


@pytest.mark.gpu
def test_cuda_runs_under_torchrun_with_nccl(tmp_path):
    """One rank on the GPU with NCCL (DDP over the trainable tensors) equals a plain CUDA process."""
    gpu_args = [*ARGS[:-2], "--device", "cuda", "--no-bf16", "--steps", "5"]
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "1", "-m", "fpt_deploy.cli", *gpu_args]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "ddp")], env=_clean_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend nccl" in done.stderr
    plain = subprocess.run(
        [sys.executable, "-m", "fpt_deploy.cli", *gpu_args, "--out", str(tmp_path / "plain")],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    _assert_close(_tensors(tmp_path / "plain"), _tensors(tmp_path / "ddp"))


def test_a_user_error_in_a_rank_that_joined_a_group_exits_without_teardown():
    from fpt_deploy.training.distributed import joined

    from fpt_deploy.errors import DataUnavailableError

    for owns_group in (True, False):
        with pytest.raises(DataUnavailableError) as e, joined(World(backend="gloo", owns_group=owns_group)):
            raise DataUnavailableError("no data")
        assert e.value.exit_without_teardown is owns_group  # only a group this process joined leaves gloo threads
