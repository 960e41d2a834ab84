"""Attention maps of a trained task: one panel per layer and head, for one or a few examples.

The paper's Figure 4 shows that on Bit XOR the frozen self-attention, with only the norms, positions and
heads trained, learns to attend from each output bit to the two input bits it depends on. This draws the
same picture for any checkpoint whose body has attention (``Body.attention_maps``): the probabilities
are computed by the body's own forward pass, so the maps are those the trained model uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fpt_deploy.errors import ConfigError, collect

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class AttentionConfig:
    """``fpt-deploy attention``: draw a checkpoint's attention maps."""

    checkpoint: Path = field(metadata={"help": "Checkpoint folder (or a run folder: its best checkpoint)."})
    input: Path | None = field(
        default=None,
        metadata={"help": "Raw inputs as .npy, (N, *input_shape); default: the first test examples."},
    )
    out: Path = field(default=Path("attention.png"), metadata={"help": "Image to write (.png, .svg or .pdf)."})
    examples: int = field(default=1, metadata={"help": "How many examples to draw (rows of panels each)."})
    data_dir: Path | None = field(default=None, metadata={"help": "The task's data (when --input is not given)."})

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.examples <= 8:
            problems.append(f"examples must be between 1 and 8 (got {self.examples})")
        self.out, self.checkpoint = Path(self.out), Path(self.checkpoint)
        if self.out.suffix not in (".png", ".svg", ".pdf"):
            problems.append(f"out must end in .png, .svg or .pdf (got {self.out.name})")
        if self.input is not None and Path(self.input).suffix != ".npy":
            problems.append(f"input must be a .npy file (got {self.input})")
        collect(problems)


@dataclass(kw_only=True)
class AttentionResult:
    out: Path
    task: str
    maps: np.ndarray  # (examples, layers, heads, L, L) attention probabilities
    tokens: np.ndarray  # (examples, L) real-token mask


def attention_maps(model, raw) -> tuple[np.ndarray, np.ndarray]:
    """(examples, layers, heads, L, L) attention probabilities and (examples, L) token mask of ``raw``."""
    import torch

    model.eval()
    with torch.no_grad():
        x = torch.as_tensor(raw)
        hidden, mask = model.input_head(x)  # (B, L, D), (B, L)
        B = hidden.shape[0]
        maps = model.body.attention_maps(
            hidden, mask, model.norm_weight.expand(B, -1, -1), model.norm_bias.expand(B, -1, -1)
        )
    return torch.stack(maps, dim=1).float().numpy(), mask.numpy()  # (B, layers, H, L, L)


def _token_labels(raw: np.ndarray, length: int) -> list[str] | None:
    """Tick labels when each token is one raw value (bit strings, token ids); else none."""
    flat = raw.reshape(-1)
    return [str(int(v)) for v in flat[:length]] if flat.size == length else None


def draw_attention(config: AttentionConfig) -> AttentionResult:
    """Write the grid of attention maps of ``config.checkpoint`` to ``config.out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fpt_deploy.checkpoint import load_checkpoint

    model, task, _ = load_checkpoint(config.checkpoint)
    if config.input is not None:
        raw = np.load(config.input)
        if raw.shape == task.spec.input_shape:
            raw = raw[None]
        if raw.shape[1:] != task.spec.input_shape:
            raise ConfigError(f"{config.input} holds {raw.shape}; task {task.name} takes (N, {task.spec.input_shape})")
    else:
        raw = task.load_data("test", config.data_dir, seed=0).inputs
    raw = np.ascontiguousarray(raw[: config.examples]).astype(task.spec.input_dtype)
    maps, mask = attention_maps(model, raw)
    n, layers, heads = maps.shape[:3]
    fig, axes = plt.subplots(
        n * layers, heads, figsize=(1.6 * heads, 1.6 * n * layers), squeeze=False, constrained_layout=True
    )
    for e in range(n):
        length = int(mask[e].sum())
        labels = _token_labels(raw[e], maps.shape[-1])
        for layer in range(layers):
            for h in range(heads):
                ax = axes[e * layers + layer, h]
                ax.imshow(maps[e, layer, h, :length, :length], cmap="viridis", vmin=0.0, vmax=1.0)
                ax.set_xticks([])
                ax.set_yticks([])
                if labels is not None and length <= 16:
                    ax.set_xticks(range(length), labels[:length], fontsize=5)
                    ax.set_yticks(range(length), labels[:length], fontsize=5)
                if layer == 0 and h == 0 and n > 1:
                    ax.set_title(f"example {e}", fontsize=7, loc="left")
                if h == 0:
                    ax.set_ylabel(f"layer {layer}", fontsize=7)
                if e == 0 and layer == 0:
                    ax.set_xlabel(f"head {h}", fontsize=7)
                    ax.xaxis.set_label_position("top")
    fig.suptitle(f"{task.name}: attention (rows attend to columns), {config.checkpoint}", fontsize=8)
    config.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(config.out, dpi=110)
    plt.close(fig)
    log.info("attention maps of %d example(s), %d layers x %d heads, written to %s", n, layers, heads, config.out)
    return AttentionResult(out=config.out, task=task.name, maps=maps, tokens=mask)
