"""``fpt-deploy reproduce``: the grid runs, writes its tables beside the paper's figures, and resumes."""

from __future__ import annotations

import json
import logging

import pytest
from fpt_deploy.training.paper_figures import paper_figure
from fpt_deploy.training.reproduce import (
    BUDGETS,
    Cell,
    ReproduceConfig,
    _ordering_sentence,
    body_for_seed,
    check_real_data,
    convergence_ratios,
    plan_cells,
    render_markdown,
    steps_to_threshold,
)
from typer.testing import CliRunner

from fpt_deploy.errors import ConfigError, DataUnavailableError


def test_ci_grid_writes_results_and_resumes(tmp_path):
    from fpt_deploy.cli import app

    out = tmp_path / "grid"
    r = CliRunner().invoke(app, ["reproduce", "--budget", "ci", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "6 cell(s) trained, 0 already done" in r.output
    results = json.loads((out / "results.json").read_text())
    done = {k: c for k, c in results["cells"].items() if c["status"] == "done"}
    assert len(done) == 7  # the 6 cells and the Bit-Memory body they start one cell from
    bit_memory_body = done["bit-memory/random/pretrain-all/seed0"]["checkpoint"]
    assert done["bit-xor/bit-memory/fpt/seed0"]["backbone"] == bit_memory_body
    assert done["bit-xor/lstm/fpt/seed0"]["backbone"] == "random-lstm-32"
    assert all(c["history"] and 0.0 <= c["test_accuracy"] <= 1.0 for c in done.values())
    assert done["bit-xor/language/all/seed0"]["lr"] == 1e-4  # the whole body fine-tunes at ALL_LR
    assert done["bit-xor/language/fpt/seed0"]["lr"] == 1e-3  # every other cell at the budget's rate
    md = (out / "results.md").read_text()
    assert "| language |" in md and "paper 56" in md and "paper 100" in md  # beside output-only and FPT
    assert (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"

    # an interrupted grid: one cell lost; only that cell trains again
    del results["cells"]["bit-xor/lstm/fpt/seed0"]
    (out / "results.json").write_text(json.dumps(results))
    r = CliRunner().invoke(app, ["reproduce", "--budget", "ci", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 cell(s) trained, 5 already done" in r.output


def test_plans_cover_the_closing_notes_grid():
    cells = plan_cells(ReproduceConfig(budget="cpu"))
    ids = {c.id for c in cells}
    for task in ("bit-xor", "bit-memory", "mnist"):
        assert {f"{task}/{s}/fpt/seed0" for s in ("language", "random", "lstm")} <= ids
    assert {f"mnist/language/{g}/seed0" for g in ("output", "+norms", "+input", "fpt", "all")} <= ids
    gpu = plan_cells(ReproduceConfig(budget="gpu", tasks=["bit-xor"]))
    assert len(gpu) == 4  # sized to one lent GPU: the four starts under FPT
    paper = {c.id for c in plan_cells(ReproduceConfig(budget="paper", tasks=["cifar10"]))}
    for cell in ("language-xl/fpt", "random-medium/fpt", "vit/fpt", "language/-norms", "random/+attention"):
        assert f"cifar10/{cell}/seed2" in paper
    assert "cifar10/random/output+positions/seed0" in paper and len(paper) == 3 * (4 * 5 + 2 * 5 + 7)


def test_random_starts_draw_a_new_body_per_seed():
    assert body_for_seed("random-gpt2", "random", 0) == "random-gpt2"
    assert body_for_seed("random-gpt2", "random", 2) == "random-gpt2@seed2"
    assert body_for_seed("random-lstm-768", "lstm", 1) == "random-lstm-768@seed1"
    assert body_for_seed("gpt2", "language", 1) == "gpt2"


def test_paper_budget_refuses_to_run_without_the_real_data(tmp_path):
    from fpt_deploy.cli import app

    r = CliRunner().invoke(
        app, ["reproduce", "--budget", "paper", "--tasks", "mnist", "--tasks", "listops-lra", "--out", str(tmp_path)]
    )
    assert r.exit_code != 0
    assert "the full MNIST (60,000 training images), not the embedded 5,000-image sample" in r.output
    assert "MNIST/raw" in r.output and "basic_val.tsv" in r.output and "--data-dir" in r.output
    assert not (tmp_path / "results.json").exists()  # refused before any cell
    assert BUDGETS["paper"].real_data and not BUDGETS["cpu"].real_data
    check_real_data(ReproduceConfig(budget="paper", tasks=["bit-xor"], out=tmp_path))


def test_the_real_data_check_says_nothing_before_it_refuses(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fpt_deploy")
    with pytest.raises(DataUnavailableError, match="mnist: the full MNIST"):
        check_real_data(ReproduceConfig(budget="paper", tasks=["mnist"], out=tmp_path))
    assert "using the embedded" not in caplog.text  # the probe loaded the sample; it must not say it uses it


def test_config_refuses_a_task_the_budget_has_no_plan_for():
    with pytest.raises(ConfigError, match="no plan for cifar10"):
        ReproduceConfig(budget="cpu", tasks=["cifar10"], seeds=0)


def test_paper_figures_are_carried_as_reported():
    assert paper_figure("mnist", "language", "fpt") == 98.0
    assert paper_figure("cifar10", "random", "fpt") == 61.7
    assert paper_figure("cifar10", "lstm", "fpt") == 34.0 and paper_figure("cifar10", "bit-memory", "fpt") == 63.0
    assert paper_figure("remote-homology", "language", "+norms") == 9
    assert paper_figure("mnist", "lstm", "fpt") is None


def _done(task, start, groups, test, history):
    return {
        "status": "done",
        "task": task,
        "start": start,
        "groups": groups,
        "seed": 0,
        "test_accuracy": test,
        "val_accuracy": max(a for _, a in history),
        "seconds": 1.0,
        "history": history,
    }


def test_steps_to_threshold_and_the_ratio():
    assert steps_to_threshold([[10, 0.5], [20, 0.9], [30, 0.99]], 0.9) == 20
    assert steps_to_threshold([[10, 0.5]], 0.9) is None
    results = {
        "cells": {
            Cell(task="bit-xor", start="language", groups="fpt", seed=0).id: _done(
                "bit-xor", "language", "fpt", 1.0, [[100, 0.6], [200, 1.0]]
            ),
            Cell(task="bit-xor", start="random", groups="fpt", seed=0).id: _done(
                "bit-xor", "random", "fpt", 0.7, [[100, 0.5], [400, 0.7], [800, 0.96]]
            ),
        }
    }
    r = convergence_ratios(results, ["bit-xor"])["bit-xor"]
    assert (r["language_steps"], r["random_steps"], r["ratio"]) == (200, 800, 4.0)
    md = render_markdown(
        {**results, "budget": "cpu", "note": "", "citation": "Lu et al."},
        [Cell(task="bit-xor", start=s, groups="fpt", seed=0) for s in ("language", "random")],
    )
    assert "| language | 100.0 / paper 100 |" in md and "4.0x" in md and "500 vs 20000 (40x)" in md


def test_ordering_sentence_says_where_it_disagrees():
    agree = _ordering_sentence("cifar10", {"language": 60.0, "random": 50.0}, {"language": 68.2, "random": 61.7})
    assert "agrees" in agree and "does not" not in agree
    disagree = _ordering_sentence("mnist", {"language": 90.0, "random": 95.0}, {"language": 98.0, "random": 91.7})
    assert "does not agree" in disagree
    tie = _ordering_sentence("bit-xor", {"language": 99.0, "random": 80.0}, {"language": 100, "random": 100})
    assert "paper ties" in tie
