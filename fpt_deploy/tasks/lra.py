"""ListOps from the Long Range Arena release (Tay et al. 2021): the TSV files, at full length.

``--data-dir`` holds ``basic_train.tsv`` and ``basic_test.tsv`` (LRA's ``lra_release/listops-1000``;
a ``listops-1000`` folder inside it works too). Each row is ``Source<TAB>Target``: the expression with
LRA's tree parentheses, and its value 0-9. The tokens are the generator's (``fpt_deploy.tasks.listops``):
digits, ``[MIN [MAX [MED [SM`` and every closing ``]``; the parentheses carry no information beyond the
brackets and are dropped. Nothing is cut: a row longer than ``max_len`` tokens is an error that names the
length to ask for (a later study found the reference loader cut rows at 512 tokens and dropped ``]``),
unless ``-o long=drop`` leaves such rows out (the paper's scoring at ``max_len=1024``, which counts them as
wrong: ``fpt-deploy reproduce`` scales the accuracy by the kept share). ``-o score_split=val`` scores LRA's
validation file (``basic_val.tsv``, the paper's) in place of ``basic_test.tsv``.
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
        "long": TaskOption(type=str, default="error", help="a row over max_len: error, or drop (the paper's)"),
        "score_split": TaskOption(type=str, default="test", help="the file scored as held out: test, or val"),
    }

    def load_data(self, split, data_dir=None, download=False, seed=0) -> TaskData:
        if self.options["long"] not in ("error", "drop") or self.options["score_split"] not in ("test", "val"):
            raise TaskDataError("listops-lra: long is error or drop, score_split is test or val")
        file_split = split if split == "train" else self.options["score_split"]
        path, L = _tsv(data_dir, file_split), self.options["max_len"]
        rows, labels = [], []
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                try:
                    rows.append(tokenize(row["Source"]))
                    labels.append(int(row["Target"]))
                except (KeyError, TypeError, ValueError) as e:
                    raise TaskDataError(f"{path}: rows need Source and Target columns ({e})") from e
        if self.options["long"] == "drop":
            keep = [i for i, ids in enumerate(rows) if len(ids) <= L]
            rows, labels = [rows[i] for i in keep], [labels[i] for i in keep]
        longest = max(map(len, rows), default=0)
        if longest > L:
            raise TaskDataError(f"{path} holds a row of {longest} tokens; pass -o max_len={longest} (nothing is cut)")
        x = np.zeros((len(rows), L), dtype=np.int64)
        for i, ids in enumerate(rows):
            x[i, : len(ids)] = ids
        return TaskData(inputs=x, labels=np.array(labels, dtype=np.int64), source=str(path))
