"""The paper's data-set tasks: TAPE remote homology and LRA ListOps, from fixture files in the real formats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fpt_deploy.errors import DataUnavailableError, TaskDataError
from fpt_deploy.tasks import get_task
from fpt_deploy.tasks.listops import TOKEN_ID

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def write_tape(root, sizes=None):
    """TAPE's raw remote-homology JSON files (a list of records, as data_raw/remote_homology.tar.gz holds)."""
    rng = np.random.default_rng(0)
    folder = root / "remote_homology"
    folder.mkdir(parents=True)
    for split, n in (sizes or {"train": 40, "valid": 8, "test_fold_holdout": 12}).items():
        records = [
            {
                "id": f"d{split}{i}",
                "primary": "".join(rng.choice(list(AMINO), size=int(rng.integers(5, 90)))),
                "protein_length": 0,
                "class_label": 0,
                "fold_label": int(rng.integers(0, 1195)) if i else 1194,
                "superfamily_label": 0,
                "family_label": 0,
            }
            for i in range(n)
        ]
        (folder / f"remote_homology_{split}.json").write_text(json.dumps(records))
    return root


LRA_ROWS = [
    ("( ( ( [MAX 2 ) 9 ) ] )", 9),
    ("( ( ( ( [MIN 4 ) ( ( [SM 3 ) 5 ) ] ) ) 7 ) ]", 4),
    ("( ( [MED 1 ) 2 3 ] )", 2),
]


def write_lra(root, rows=LRA_ROWS, copies=8):
    """LRA's listops-1000 TSV files: a header, then Source<TAB>Target."""
    folder = root / "listops-1000"
    folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        lines = ["Source\tTarget"] + [f"{s}\t{t}" for s, t in rows * copies]
        (folder / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_remote_homology_reads_tape_json(tmp_path):
    root = write_tape(tmp_path)
    task = get_task("remote-homology", max_len=64)
    train, test = task.load_data("train", root), task.load_data("test", root)
    assert train.inputs.shape == (40, 64) and test.inputs.shape == (12, 64)
    assert task.spec.num_classes == 1195 and train.labels[0] == 1194
    first = json.loads((root / "remote_homology" / "remote_homology_train.json").read_text())[0]["primary"]
    expected = [ord(c) - ord("A") + 1 for c in first[:64]]
    np.testing.assert_array_equal(train.inputs[0, : len(expected)], expected)
    assert (train.inputs[0, len(expected) :] == 0).all()  # padding after the residues only


def test_remote_homology_names_the_download_when_missing(tmp_path):
    with pytest.raises(DataUnavailableError, match="s3.amazonaws.com/proteindata"):
        get_task("remote-homology").load_data("train", tmp_path)


def test_remote_homology_refuses_bad_records(tmp_path):
    (tmp_path / "remote_homology_train.json").write_text(json.dumps([{"primary": "AC1", "fold_label": 3}]))
    with pytest.raises(TaskDataError, match="A-Z"):
        get_task("remote-homology").load_data("train", tmp_path)


def test_lra_listops_keeps_every_closing_bracket_and_the_full_length(tmp_path):
    root = write_lra(tmp_path)
    data = get_task("listops-lra", max_len=32).load_data("train", root)
    assert data.inputs.shape == (24, 32)
    row = data.inputs[1]
    assert (row == TOKEN_ID["]"]).sum() == 2  # "[MIN ... [SM ... ] ... ]": both kept
    assert (row != 0).sum() == 8  # [MIN 4 [SM 3 5 ] 7 ]: every token but the parentheses
    np.testing.assert_array_equal(data.labels[:3], [9, 4, 2])


def test_lra_listops_refuses_to_cut_a_long_row(tmp_path):
    root = write_lra(tmp_path)
    with pytest.raises(TaskDataError, match="max_len=8"):
        get_task("listops-lra", max_len=7).load_data("train", root)


def test_the_papers_scoring_drops_long_rows_and_reads_the_validation_split(tmp_path):
    root = write_lra(tmp_path)
    (root / "listops-1000" / "basic_val.tsv").write_text("Source\tTarget\n( [MAX 2 3 ] )\t3\n")
    lra = get_task("listops-lra", max_len=7, long="drop", score_split="val")
    assert lra.load_data("train", root).inputs.shape == (16, 7)  # the 8-token row left out, nothing cut
    assert lra.load_data("test", root).labels.tolist() == [3]  # basic_val.tsv, not basic_test.tsv
    tape = write_tape(tmp_path / "tape")
    homology = get_task("remote-homology", max_len=40, long="drop", test_split="valid")
    valid = homology.load_data("test", tape)
    records = json.loads((tape / "remote_homology" / "remote_homology_valid.json").read_text())
    assert len(valid.labels) == sum(len(r["primary"]) <= 40 for r in records)


def test_bit_memory_draws_fresh_strings_every_batch_when_asked():
    fixed, fresh = get_task("bit-memory", n=20, patch=5), get_task("bit-memory", n=20, patch=5, fresh=True)
    assert fixed.fresh_batch(4, seed=0, step=0) is None
    x0, y0 = fresh.fresh_batch(4, seed=0, step=0)
    x1, _ = fresh.fresh_batch(4, seed=0, step=1)
    assert x0.shape == (4, 120) and y0.shape == (4, 20) and not np.array_equal(x0, x1)
    np.testing.assert_array_equal(fresh.fresh_batch(4, seed=0, step=0)[0], x0)  # a resumed run replays it
    strings, query = x0[:, :100].reshape(4, 5, 20), x0[:, 100:]
    assert all(any((s == y).all() for s in row) for row, y in zip(strings, y0, strict=True))  # the target is one
    assert ((query == 2) | (query == y0)).all()  # the query: the target, half masked


def test_lra_listops_names_the_release_when_missing(tmp_path):
    with pytest.raises(DataUnavailableError, match="lra_release"):
        get_task("listops-lra").load_data("test", tmp_path)


def test_both_train_export_and_serve_from_their_fixtures(tmp_path):
    from fpt_deploy.export import ExportConfig, export_task
    from fpt_deploy.serving.config import PredictConfig
    from fpt_deploy.serving.predict import predict
    from fpt_deploy.training import TrainConfig, train

    data = write_lra(write_tape(tmp_path / "data"))
    checkpoints = []
    for name, options in (("remote-homology", {"max_len": 96}), ("listops-lra", {"max_len": 32})):
        config = TrainConfig(
            task=name,
            backbone="tiny-bert",
            steps=2,
            batch_size=8,
            out=tmp_path / name,
            data_dir=data,
            task_options=options,
            progress=False,
        )
        checkpoints.append(train(config).checkpoint)
    repo = tmp_path / "deploy"
    export_task(
        ExportConfig(tasks=["remote-homology", "listops-lra"], checkpoints=checkpoints, repo=repo, data_dir=data)
    )
    rows = get_task("listops-lra", max_len=32).load_data("test", data).inputs[:3]
    np.save(tmp_path / "rows.npy", rows)
    served = predict(PredictConfig(repo=repo, task="listops-lra", input=tmp_path / "rows.npy"))
    assert served.labels.shape == (3,) and served.probabilities.shape == (3, 10)
    proteins = get_task("remote-homology", max_len=96).load_data("test", data).inputs[:2]
    np.save(tmp_path / "proteins.npy", proteins)
    served = predict(PredictConfig(repo=repo, task="remote-homology", input=tmp_path / "proteins.npy"))
    assert served.probabilities.shape == (2, 1195)
    np.testing.assert_allclose(served.probabilities.sum(-1), 1.0, rtol=1e-4)
