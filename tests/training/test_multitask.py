"""Several tasks as one job against one frozen body: per-task checkpoints, shared body, option routing."""

from __future__ import annotations

import fpt_deploy.training.loop as loop
import pytest
import torch
from fpt_deploy.training import TrainConfig, multitask_configs, split_task_options, train, train_multitask
from fpt_deploy.training.multitask import parse_task_list
from safetensors.torch import load_file
from typer.testing import CliRunner

from fpt_deploy.checkpoint import load_checkpoint
from fpt_deploy.cli import app
from fpt_deploy.errors import ConfigError, UnknownNameError

TASKS = ["bit-xor", "mnist", "bit-memory"]
OPTIONS = [
    "bit-xor:train_size=64",
    "bit-xor:test_size=32",
    "bit-memory:n=20",
    "bit-memory:patch=5",
    "bit-memory:train_size=64",
    "bit-memory:test_size=32",
]


def _settings(**overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "backbone": "tiny-bert",
            "steps": 4,
            "batch_size": 16,
            "eval_every": 2,
            "progress": False,
            "device": "cpu",
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The three tasks trained as one job, recording every FPT the job builds."""
    out = tmp_path_factory.mktemp("job")
    built = []
    real_fpt = loop.FPT

    def recording_fpt(task, body, *options):
        built.append(real_fpt(task, body, *options))
        return built[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "FPT", recording_fpt)
        results = train_multitask(multitask_configs(_settings(), TASKS, OPTIONS, out))
    return {"out": out, "results": results, "models": built}


def test_each_task_gets_a_loadable_checkpoint_of_its_own(job):
    assert [r.task for r in job["results"]] == TASKS
    for task, result in zip(TASKS, job["results"], strict=True):
        assert result.checkpoint == job["out"] / task / "best" and result.steps == 4
        model, loaded_task, config = load_checkpoint(job["out"] / task / "best")
        assert loaded_task.name == task and config["train_config"]["task"] == task
        assert (job["out"] / task / "last" / "trainer_state.pt").is_file()
    assert load_checkpoint(job["out"] / "bit-memory" / "best")[1].options["n"] == 20


def test_the_tasks_share_one_body_instance(job):
    models = job["models"]
    assert len(models) == 3
    assert models[0].body is models[1].body is models[2].body
    assert len({id(m.norm_weight) for m in models}) == 3  # but each owns its norms


def test_each_task_trains_exactly_as_it_would_alone(job, tmp_path):
    """The body is frozen and in eval mode, so tasks do not interact: same tensors as a job of one."""
    per_task = split_task_options(TASKS, OPTIONS)
    for task in ("bit-xor", "bit-memory"):
        alone = train(_settings(task=task, task_options=per_task[task], out=tmp_path / task))
        assert alone.best_accuracy == job["results"][TASKS.index(task)].best_accuracy
        a = load_file(str(tmp_path / task / "last" / "trainable.safetensors"))
        b = load_file(str(job["out"] / task / "last" / "trainable.safetensors"))
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_a_multitask_job_resumes_each_task(job, tmp_path):
    import shutil

    out = tmp_path / "job"
    shutil.copytree(job["out"], out)
    configs = multitask_configs(_settings(steps=6, resume=True), TASKS, OPTIONS, out)
    assert [r.steps for r in train_multitask(configs)] == [6, 6, 6]
    history = torch.load(out / "mnist" / "last" / "trainer_state.pt", weights_only=False)["history"]
    assert [h["step"] for h in history] == [2, 4, 6]


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], {"mnist": {}, "bit-xor": {}}),
        (["bit-xor:n=3"], {"mnist": {}, "bit-xor": {"n": "3"}}),
        (["patch=7"], {"mnist": {"patch": "7"}, "bit-xor": {"patch": "7"}}),  # unprefixed: every task
        (["mnist:patch=7", "bit-xor:train_size=10"], {"mnist": {"patch": "7"}, "bit-xor": {"train_size": "10"}}),
        (["bit-xor:x=a:b"], {"mnist": {}, "bit-xor": {"x": "a:b"}}),  # only the key may name a task
    ],
)
def test_options_are_routed_to_their_task(pairs, expected):
    assert split_task_options(["mnist", "bit-xor"], pairs) == expected


@pytest.mark.parametrize(
    ("tasks", "pairs", "message"),
    [
        ("mnist,bit-xor", ["cifar10:patch=2"], "names task 'cifar10', which is not among mnist, bit-xor"),
        ("mnist,bit-xor,mnist", [], "mnist more than once"),
        (" , ", [], "names no task"),
        ("mnist", ["n5"], "KEY=VALUE"),
    ],
)
def test_bad_task_lists_and_options_are_config_errors(tasks, pairs, message):
    with pytest.raises(ConfigError, match=message):
        split_task_options(parse_task_list(tasks), pairs)


def test_jobs_must_share_the_body_and_write_distinct_folders(tmp_path):
    with pytest.raises(ConfigError, match="share one backbone"):
        train_multitask(
            [_settings(task="mnist", backbone="tiny-bert"), _settings(task="bit-xor", backbone="tiny-gpt2")]
        )
    with pytest.raises(ConfigError, match="same run folder"):
        train_multitask([_settings(task="mnist", out=tmp_path), _settings(task="bit-xor", out=tmp_path)])


def test_cli_tasks_writes_one_run_folder_per_task(tmp_path):
    args = [
        "train",
        "--tasks",
        "bit-xor,mnist",
        "-b",
        "tiny-bert",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "-o",
        "bit-xor:train_size=32",
        "-o",
        "bit-xor:test_size=16",
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for task in ("bit-xor", "mnist"):  # one summary line each (the split it names is training's business)
        assert sum(line.startswith(f"{task}: best ") for line in result.output.splitlines()) == 1, result.output
    for task in ("bit-xor", "mnist"):
        assert load_checkpoint(tmp_path / task)[1].name == task  # a run folder resolves to its best


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "mnist", "--tasks", "mnist,bit-xor"], "not both"),
        (["--tasks", "mnist,nope"], "unknown task 'nope'"),
        (["--tasks", "mnist,bit-xor", "-o", "bit-xor:colour=red"], "has no option colour"),
    ],
)
def test_cli_task_list_errors_exit_2(args, message, tmp_path):
    cli_args = ["train", *args, "-b", "tiny-bert", "--steps", "1", "--device", "cpu", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, cli_args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_unknown_task_in_a_job_is_an_unknown_name():
    with pytest.raises(UnknownNameError):
        train_multitask(multitask_configs(_settings(), ["nope"], []))
