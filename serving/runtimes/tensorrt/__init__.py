"""TensorRT: build an engine of the backbone, check it, and serve it. Torch-free; CUDA through cuda-python.

The package is split so that each user imports only what it needs:

- ``config``: ``EngineConfig`` (``fpt-deploy build-engine``'s options), the variants and tolerances:
  cheap to import, no TensorRT, no CUDA, no ONNX;
- ``graph``: the ONNX side (operator check, task-index wrapper, fp16 rewrite), runs anywhere;
- ``cuda``: the few cuda-python calls, TensorRT's import and version check, its logger;
- ``session``: ``EngineSession``, a deserialized engine with its device buffers and stream, and
  ``EngineCapacity``;
- ``runtime``: ``TensorRTRuntime`` (``--runtime tensorrt``), the run side;
- ``build``: ``build_engine`` (what ``fpt-deploy build-engine`` calls), the build side; its parity check
  runs through the same ``EngineSession`` the runtime serves with.

The engine is the repository's backbone wrapped with a Gather by ``task_index`` from resident norm
tables (``graph.wrap_with_task_index``). Its I/O::

    hidden (B, L, D) f32, attention_mask (B, L) i64, task_index (B,) i64,
    norm_table_weight / norm_table_bias (T, N_norm, D) f32            ->  last_hidden (B, L, D) f32

B, L and T are dynamic within one optimisation profile; its maxima are the engine's capacity, which
``serve`` compares with its settings before it accepts a request (``EngineCapacity``). Device buffers
are allocated once for the maxima and bound once; a call copies hidden, mask and indices in and
``last_hidden`` out on one stream. The tables are copied when tasks are loaded, live ones included.

What runs without a GPU: the graph steps and the capacity arithmetic. Where TensorRT, cuda-python or
a usable GPU is missing, the first call that needs one raises ``RuntimeUnavailableError`` saying what
to install or where to run. Importing this package imports none of its modules.
"""
