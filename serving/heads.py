"""Task heads at serving time: one pair of sessions per head shape, every task's weights as table rows.

    SharedHeads   every task of one head shape (format /2, export/heads.py): two sessions, and tables
                  (T, ...) whose row ``slot`` is one task's input layer, positions and output layer.
                  A batch's rows of all these tasks run in ONE input call and ONE output call, each row
                  gathering its task's weights by ``task_index`` inside the graph.
    OwnHeads      a task of format /1: its own input.onnx / output.onnx (weights inside the graphs).

``RowTables`` holds named tables whose first axis is a slot. Adding a task writes its rows into a
free slot (growing the tables by doubling, so N additions copy O(N) rows in all); removing one frees
its slot. A resize swaps in new arrays as one tuple, so a call that already started keeps the tables
it read. Tables are fed to ONNX Runtime whole; it reads CPU numpy inputs in place, without a copy.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from fpt_deploy.serving.runtimes.sessions import create_head_session

from fpt_deploy.artifacts import (
    HEAD_TASK_INDEX,
    INPUT_HEAD_INPUT,
    INPUT_HEAD_OUTPUTS,
    OUTPUT_HEAD_INPUTS,
    OUTPUT_HEAD_OUTPUT,
)
from fpt_deploy.errors import ArtifactError


class RowTables:
    """Named float32 tables (capacity, *row_shape) with one slot a task; slots are reused once freed."""

    def __init__(self, row_shapes: dict[str, tuple[int, ...]], capacity: int = 1) -> None:
        self.row_shapes = dict(row_shapes)
        self._arrays = {n: np.zeros((max(capacity, 1), *s), np.float32) for n, s in self.row_shapes.items()}
        self._free: list[int] = []
        self._used = 0  # slots ever handed out: 0 .. _used-1
        self._lock = threading.Lock()

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The current tables (a snapshot: a later resize replaces the dict, never mutates this one)."""
        return self._arrays

    @property
    def capacity(self) -> int:
        return next(iter(self._arrays.values())).shape[0]

    @property
    def count(self) -> int:
        return self._used - len(self._free)

    def reserve(self, capacity: int) -> None:
        """Grow to at least ``capacity`` rows now (start-up knows how many tasks it loads)."""
        with self._lock:
            self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        grown = {}
        for name, old in self._arrays.items():
            new = np.zeros((capacity, *old.shape[1:]), np.float32)
            new[: self._used] = old[: self._used]
            grown[name] = new
        self._arrays = grown  # one assignment: readers see the old tables or the new ones

    def check(self, rows: dict[str, np.ndarray], what: str) -> None:
        """``ArtifactError`` unless ``rows`` are one row of every table, each of its shape."""
        if set(rows) != set(self.row_shapes):
            raise ArtifactError(f"{what} has rows {sorted(rows)}; its head graphs take {sorted(self.row_shapes)}")
        for name, row in rows.items():
            if tuple(row.shape) != self.row_shapes[name]:
                raise ArtifactError(
                    f"{what}: row {name!r} has shape {tuple(row.shape)}, its head graphs take {self.row_shapes[name]}"
                )

    def add(self, rows: dict[str, np.ndarray], what: str) -> int:
        """Write one task's ``rows`` into a free slot and return the slot."""
        self.check(rows, what)
        with self._lock:
            if self._free:
                slot = self._free.pop()
            else:
                slot = self._used
                if slot >= self.capacity:
                    self._grow(2 * self.capacity)
                self._used += 1
            for name, row in rows.items():
                self._arrays[name][slot] = row
        return slot

    def free(self, slot: int) -> None:
        """Release ``slot`` (its rows are zeroed); no request may still use it."""
        with self._lock:
            for table in self._arrays.values():
                table[slot] = 0
            self._free.append(slot)


def _row_shapes(session, skip: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The tables a shared head graph takes: every input but ``skip``, with its (T, ...) row shape."""
    shapes = {}
    for i in session.get_inputs():
        if i.name in skip:
            continue
        if not all(isinstance(d, int) for d in i.shape[1:]):
            raise ArtifactError(f"head graph input {i.name!r} has a dynamic row shape {i.shape}; re-export the task")
        shapes[i.name] = tuple(i.shape[1:])
    return shapes


class SharedHeads:
    """Every loaded task of one head shape: two sessions for all of them, their weights as table rows."""

    shared = True

    def __init__(self, key: str, input_path: Path, output_path: Path, capacity: int = 1) -> None:
        self.key = key
        self.input_session = create_head_session(input_path)
        self.output_session = create_head_session(output_path)
        inputs = _row_shapes(self.input_session, (INPUT_HEAD_INPUT, HEAD_TASK_INDEX))
        outputs = _row_shapes(self.output_session, (*OUTPUT_HEAD_INPUTS, HEAD_TASK_INDEX))
        self._input_tables, self._output_tables = tuple(inputs), tuple(outputs)
        self.tables = RowTables(inputs | outputs, capacity)

    @property
    def tasks(self) -> int:
        return self.tables.count

    def check_rows(self, rows: dict[str, np.ndarray], what: str) -> None:
        self.tables.check(rows, what)

    def add(self, rows: dict[str, np.ndarray], what: str) -> int:
        return self.tables.add(rows, what)

    def remove(self, slot: int) -> None:
        self.tables.free(slot)

    def run_input(self, raw: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """raw (n, *input) of any tasks of this shape, slots (n,) int64 -> hidden (n, L, D), mask (n, L)."""
        tables = self.tables.arrays
        feeds = {INPUT_HEAD_INPUT: raw, HEAD_TASK_INDEX: slots} | {n: tables[n] for n in self._input_tables}
        hidden, mask = self.input_session.run(list(INPUT_HEAD_OUTPUTS), feeds)
        return hidden, mask

    def run_output(self, last_hidden: np.ndarray, mask: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """last_hidden (n, L, D), mask (n, L), slots (n,) -> logits (n, *logits_shape)."""
        tables = self.tables.arrays
        feeds = dict(zip(OUTPUT_HEAD_INPUTS, (last_hidden, mask), strict=True)) | {HEAD_TASK_INDEX: slots}
        feeds |= {n: tables[n] for n in self._output_tables}
        return self.output_session.run([OUTPUT_HEAD_OUTPUT], feeds)[0]


class OwnHeads:
    """A format /1 task's own input and output graphs (its weights are constants inside them)."""

    shared = False
    tasks = 1

    def __init__(self, key: str, input_path: Path, output_path: Path) -> None:
        self.key = key
        self.input_session = create_head_session(input_path)
        self.output_session = create_head_session(output_path)

    def check_rows(self, rows: dict[str, np.ndarray], what: str) -> None:
        """Nothing to check: the weights are inside the task's own graphs."""

    def add(self, rows: dict[str, np.ndarray], what: str) -> int:
        return 0

    def remove(self, slot: int) -> None:
        """Nothing to free: the sessions go with the task."""

    def run_input(self, raw: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hidden, mask = self.input_session.run(list(INPUT_HEAD_OUTPUTS), {INPUT_HEAD_INPUT: raw})
        return hidden, mask

    def run_output(self, last_hidden: np.ndarray, mask: np.ndarray, slots: np.ndarray) -> np.ndarray:
        feeds = dict(zip(OUTPUT_HEAD_INPUTS, (last_hidden, mask), strict=True))
        return self.output_session.run([OUTPUT_HEAD_OUTPUT], feeds)[0]
