"""Typed errors. Each subclasses a builtin too, so callers can catch either (the PEFT habit)."""

from __future__ import annotations


class FptDeployError(Exception):
    """Base of every error fpt-deploy raises on purpose; the CLI turns it into exit code 2."""

    # Set (on the instance) by code that leaves threads behind which interpreter teardown can abort on,
    # e.g. a torchrun rank after torch.distributed's gloo: the CLI then reports the error and exits
    # at once (os._exit) instead of a clean exit that would turn into a SIGABRT.
    exit_without_teardown: bool = False


class ConfigError(FptDeployError, ValueError):
    """A setting or option is invalid. The message lists every problem found."""


class UnknownNameError(FptDeployError, LookupError):
    """A task, backbone or other registry name does not exist."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0])


class BackboneUnavailableError(FptDeployError, FileNotFoundError):
    """Backbone weights cannot be found offline."""


class DataUnavailableError(FptDeployError, FileNotFoundError):
    """No data source can serve a task's data set."""


class TaskDataError(FptDeployError, ValueError):
    """A declared task's data does not fit its declaration; the message lists every problem."""


class CheckpointError(FptDeployError, ValueError):
    """A checkpoint is missing, corrupt, or belongs to another model."""


class FingerprintMismatchError(FptDeployError, ValueError):
    """Heads were trained on a different frozen body than the one offered."""


class ArtifactError(FptDeployError, ValueError):
    """A deployment repository or one of its files is missing or corrupt."""


class ExportMismatchError(FptDeployError, ValueError):
    """An exported graph disagrees with the PyTorch reference beyond tolerance."""


class ExportUnsupportedError(FptDeployError, ValueError):
    """A trained model has parts the repository format cannot hold (hidden head layers, say)."""


class RuntimeUnavailableError(FptDeployError, RuntimeError):
    """A runtime (CUDA, TensorRT) is not installed or has no device here."""


def collect(problems: list[str], error: type[FptDeployError] = ConfigError) -> None:
    """Raise ``error`` once with every problem found, or do nothing when there are none."""
    if problems:
        raise error("; ".join(problems))
