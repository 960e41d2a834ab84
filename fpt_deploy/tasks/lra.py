"""ListOps from the Long Range Arena release (Tay et al. 2021): the TSV files, at full length.

``--data-dir`` holds ``basic_train.tsv`` and ``basic_test.tsv`` (LRA's ``lra_release/listops-1000``;
a ``listops-1000`` folder inside it works too). Each row is ``Source<TAB>Target``: the expression with
LRA's tree parentheses, and its value 0-9. The tokens are the generator's (``fpt_deploy.tasks.listops``):
digits, ``[MIN [MAX [MED [SM`` and every closing ``]``; the parentheses carry no information beyond the
brackets and are dropped. Nothing is cut: a row longer than ``max_len`` tokens is an error that names the
length to ask for (a later study found the reference loader cut rows at 512 tokens and dropped ``]``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fpt_deploy.errors import DataUnavailableError, TaskDataError
from fpt_deploy.tasks.base import TaskData, TaskOption, TokenTask
from fpt_deploy.tasks.listops import TOKEN_ID, VOCAB

LRA_URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"
DROPPED = ("(", ")")


def tokenize(source: str) -> list[int]:
    """LRA's Source string -> token ids; an unknown token is an error."""
    words = [w for w in source.split() if w not in DROPPED]
    try:
        return [TOKEN_ID[w] for w in words]
    except KeyError as e:
        raise TaskDataError(f"listops-lra: unknown token {e.args[0]!r} in {source[:60]!r}") from None


def _tsv(data_dir: Path | None, split: str) -> Path:
    name = f"basic_{split}.tsv"
    roots = [] if data_dir is None else [Path(data_dir), Path(data_dir) / "listops-1000"]
    for root in roots:
        if (root / name).is_file():
            return root / name
    raise DataUnavailableError(
        f"listops-lra needs LRA's {name} in --data-dir ({' or '.join(map(str, roots)) or 'none given'}); "
        f"download {LRA_URL} and pass its lra_release/listops-1000 folder"
    )


class ListOpsLra(TokenTask):
    name = "listops-lra"
    description = "ListOps from the Long Range Arena TSV files (--data-dir), full length, 10 classes"
    vocab_size = len(VOCAB)
    num_classes = 10
    declared_options = {
        "max_len": TaskOption(type=int, default=2000, help="tokens a row (LRA's rows reach 2,000)"),
    }

    def load_data(self, split, data_dir=None, download=False, seed=0) -> TaskData:
        path, L = _tsv(data_dir, split), self.options["max_len"]
        rows, labels = [], []
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                try:
                    rows.append(tokenize(row["Source"]))
                    labels.append(int(row["Target"]))
                except (KeyError, TypeError, ValueError) as e:
                    raise TaskDataError(f"{path}: rows need Source and Target columns ({e})") from e
        longest = max(map(len, rows), default=0)
        if longest > L:
            raise TaskDataError(f"{path} holds a row of {longest} tokens; pass -o max_len={longest} (nothing is cut)")
        x = np.zeros((len(rows), L), dtype=np.int64)
        for i, ids in enumerate(rows):
            x[i, : len(ids)] = ids
        return TaskData(inputs=x, labels=np.array(labels, dtype=np.int64), source=str(path))
