"""Where a task's data comes from: the fields every config that reads data shares, declared once.

``TrainConfig``, ``EvaluateConfig`` and ``ExportConfig`` each take ``data_dir`` and ``download``::

    data_dir: Path | None = data_dir_field()
    download: bool = download_field()
"""

from __future__ import annotations

from dataclasses import field


def data_dir_field():
    return field(default=None, metadata={"help": "Data in torchvision's layout (MNIST, CIFAR-10)."})


def download_field():
    return field(default=False, metadata={"help": "Allow torchvision to download the data set."})
