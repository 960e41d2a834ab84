"""Shared head graphs: which tasks share them, and that the graphs compute each task's own heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _model(task: str, **options):
    from fpt_deploy.backbones import load_backbone
    from fpt_deploy.model import FPT
    from fpt_deploy.tasks import get_task

    torch.manual_seed(len(options))
    return FPT(get_task(task, **options), load_backbone("tiny-bert")).eval()


def test_tasks_of_one_shape_share_a_key_and_other_shapes_do_not():
    from fpt_deploy.export.heads import head_key, head_signature

    def key(model):
        return head_key(head_signature(model, 18))

    a, b = _model("mnist"), _model("mnist")
    b.input_head.position.data += 1.0  # other weights, same shape: rows, not graphs
    assert key(a) == key(b)
    assert key(_model("mnist", patch=7)) != key(a)  # other preprocessing and token count
    assert key(_model("bit-xor")) != key(a)


def test_preprocessing_with_state_that_cannot_be_compared_keeps_its_own_graphs():
    from fpt_deploy.export.heads import head_key, head_signature

    a, b = _model("mnist"), _model("mnist")
    for model in (a, b):
        model.input_head.preprocess.hook = lambda x: x  # not data: two such tasks cannot be told apart
    b.spec = type(b.spec)(**{**b.spec.__dict__, "name": "mnist-b"})
    assert "own_task" in head_signature(a, 18)
    assert head_key(head_signature(a, 18)) != head_key(head_signature(b, 18))


@pytest.mark.parametrize("task", ["mnist", "listops"])
def test_shared_graphs_gather_each_rows_weights(task, tmp_path):
    """Two tasks of one shape in one call, as rows 0 and 1 of the tables: each gets its own heads' output."""
    import onnxruntime as ort
    from fpt_deploy.export.graphs import example_raw_input
    from fpt_deploy.export.heads import head_rows, write_head_graphs

    a, b = _model(task), _model(task)
    for p in b.input_head.parameters():
        p.data += 0.5 * torch.randn_like(p)
    b.output_head.linear.weight.data *= -1
    inp, out = write_head_graphs(a, tmp_path, 18)
    rows = [head_rows(a), head_rows(b)]
    tables = {n: np.stack([r[n] for r in rows]) for n in rows[0]}
    sin, sout = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (inp, out))
    raw = example_raw_input(a.spec, 4).numpy()
    index = np.array([0, 1, 1, 0], np.int64)
    feeds = {i.name: tables[i.name] for i in sin.get_inputs() if i.name in tables}
    hidden, mask = sin.run(None, {"input": raw, "task_index": index, **feeds})
    last = np.tanh(hidden)  # any body: the output head must read each row with its own task's layer
    feeds = {i.name: tables[i.name] for i in sout.get_inputs() if i.name in tables}
    logits = sout.run(None, {"last_hidden": last, "attention_mask": mask, "task_index": index, **feeds})[0]
    with torch.no_grad():
        for row, model in enumerate([a, b, b, a]):
            h, m = model.input_head(torch.from_numpy(raw[row : row + 1]))
            np.testing.assert_allclose(hidden[row], h[0].numpy(), atol=1e-5)
            ref = model.output_head(torch.from_numpy(last[row : row + 1]), m)
            np.testing.assert_allclose(logits[row], ref[0].numpy(), atol=1e-5)
