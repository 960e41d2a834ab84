"""Remote homology (TAPE; Rao et al. 2019): a protein's fold, 1,195 classes, from its amino-acid sequence.

The paper's protein task (Lu et al. 2021, section 3.1). Data: TAPE's ``remote_homology`` files in
``--data-dir`` (or ``--data-dir``/remote_homology), either the raw JSON files
``remote_homology_{train,test_fold_holdout,...}.json`` (a list of records with ``primary``, the sequence,
and ``fold_label``) or the LMDB folders ``remote_homology_<split>.lmdb`` (records pickled under the keys
"0", "1", ..., their count under ``num_examples``; reading them needs the ``lmdb`` package).

Tokens: 0 = padding, the letters A-Z -> 1..26 (the IUPAC amino-acid codes with B, Z, X, U, O). A
sequence longer than ``max_len`` keeps its first ``max_len`` residues (``-o long=cut``, the default: every
protein gets an answer), or is left out (``-o long=drop``, the paper's scoring, which counts those as wrong:
``fpt-deploy reproduce`` scales the accuracy by the kept share); the log says how many.

The paper scores TAPE's ``valid`` split (``-o test_split=valid``); the default is the fold hold-out test set.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np

from fpt_deploy.errors import DataUnavailableError, TaskDataError
from fpt_deploy.tasks.base import TaskData, TaskOption, TaskSpec, TokenTask

log = logging.getLogger(__name__)

NUM_FOLDS = 1195
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
VOCAB_SIZE = 1 + len(LETTERS)
TAPE_URLS = (
    "http://s3.amazonaws.com/proteindata/data_raw/remote_homology.tar.gz (JSON) or "
    "http://s3.amazonaws.com/proteindata/data_pytorch/remote_homology.tar.gz (LMDB)"
)
TEST_SPLITS = ("test_fold_holdout", "test_superfamily_holdout", "test_family_holdout", "valid")
LONG_RULES = ("cut", "drop")


def encode_protein(sequence: str, max_len: int) -> np.ndarray:
    """Token ids (max_len,) int64 of one sequence, padded with 0, cut at ``max_len``."""
    ids = np.frombuffer(sequence.upper().encode("ascii"), dtype=np.uint8).astype(np.int64) - ord("A") + 1
    if ids.size and (ids.min() < 1 or ids.max() > len(LETTERS)):
        raise TaskDataError(f"remote-homology: sequence holds characters other than A-Z: {sequence[:40]!r}")
    out = np.zeros(max_len, dtype=np.int64)
    out[: min(len(ids), max_len)] = ids[:max_len]
    return out


def _read_lmdb(path: Path) -> list[dict]:
    try:
        import lmdb
    except ImportError as e:
        raise DataUnavailableError(
            f"{path} is an LMDB folder and reading it needs the lmdb package (pip install lmdb); "
            f"or use TAPE's JSON files: {TAPE_URLS}"
        ) from e
    env = lmdb.open(str(path), max_readers=1, readonly=True, lock=False, readahead=False, meminit=False)
    with env.begin(write=False) as txn:
        n = pickle.loads(txn.get(b"num_examples"))
        records = [pickle.loads(txn.get(str(i).encode())) for i in range(n)]
    env.close()
    return records


def read_tape_split(data_dir: Path | None, split: str) -> tuple[list[dict], Path]:
    """The records of one TAPE remote-homology split, from JSON or LMDB, and the file they came from."""
    roots = [] if data_dir is None else [Path(data_dir), Path(data_dir) / "remote_homology"]
    for root in roots:
        json_file, lmdb_dir = root / f"remote_homology_{split}.json", root / f"remote_homology_{split}.lmdb"
        if json_file.is_file():
            try:
                return json.loads(json_file.read_text()), json_file
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{json_file} is not valid JSON ({e}); download it again") from e
        if lmdb_dir.is_dir():
            return _read_lmdb(lmdb_dir), lmdb_dir
    where = " or ".join(str(r) for r in roots) or "no --data-dir given"
    raise DataUnavailableError(
        f"remote-homology needs TAPE's remote_homology_{split}.json (or .lmdb) in --data-dir ({where}); "
        f"download and unpack {TAPE_URLS}"
    )


class RemoteHomology(TokenTask):
    name = "remote-homology"
    description = "TAPE remote homology: a protein's fold (1,195 classes) from its amino acids (--data-dir)"
    vocab_size = VOCAB_SIZE
    num_classes = NUM_FOLDS
    declared_options = {
        "max_len": TaskOption(type=int, default=1024, help="residues a sequence (longer ones are cut)"),
        "test_split": TaskOption(
            type=str, default="test_fold_holdout", help="TAPE's held-out split to score (valid: the paper's)"
        ),
        "long": TaskOption(type=str, default="cut", help="a sequence over max_len: cut, or drop (the paper's)"),
    }

    def build_spec(self) -> TaskSpec:
        if self.options["test_split"] not in TEST_SPLITS:
            raise TaskDataError(f"remote-homology: test_split must be one of {', '.join(TEST_SPLITS)}")
        if self.options["long"] not in LONG_RULES:
            raise TaskDataError(f"remote-homology: long must be one of {', '.join(LONG_RULES)}")
        return super().build_spec()

    def load_data(self, split, data_dir=None, download=False, seed=0) -> TaskData:
        tape_split = "train" if split == "train" else self.options["test_split"]
        records, source = read_tape_split(data_dir, tape_split)
        L = self.options["max_len"]
        if self.options["long"] == "drop":
            kept = [r for r in records if len(r.get("primary", "")) <= L]
            log.info(
                "remote-homology %s: %d of %d sequences over %d residues dropped",
                tape_split,
                len(records) - len(kept),
                len(records),
                L,
            )
            records = kept
        try:
            x = np.stack([encode_protein(r["primary"], L) for r in records]) if records else np.zeros((0, L))
            y = np.array([int(r["fold_label"]) for r in records], dtype=np.int64)
        except (KeyError, TypeError) as e:
            raise TaskDataError(f"{source}: records need 'primary' and 'fold_label' ({e})") from e
        if len(y) and (y.min() < 0 or y.max() >= NUM_FOLDS):
            raise TaskDataError(f"{source}: fold labels must lie in [0, {NUM_FOLDS}), got [{y.min()}, {y.max()}]")
        cut = sum(len(r["primary"]) > L for r in records)
        if cut:
            log.info("remote-homology %s: %d of %d sequences cut to %d residues", tape_split, cut, len(records), L)
        return TaskData(inputs=x.astype(np.int64), labels=y, source=str(source))
