"""dscl: Decoupled Contrastive Learning (DSCL + PBSD) for long-tailed image recognition.

Sub-packages follow the method: ``dscl.data`` (datasets, long-tailed construction, samplers,
views and patches), ``dscl.models`` (backbones, heads, the momentum-contrast model and its
queue), ``dscl.losses`` (DSCL and PBSD), ``dscl.engine`` (both training stages, evaluation,
checkpoints, distributed helpers) and the command-line interface ``dscl.cli``.
``dscl.load(run_dir)`` gives a finished run's classifier, ready for tensors.
"""

from .errors import CheckpointError, ConfigError, DataError, DSCLError, NumericalError
from .version import __version__

__all__ = ["CheckpointError", "ConfigError", "DSCLError", "DataError", "NumericalError", "__version__", "load"]


def load(run_dir, device="cpu"):
    """The classifier of a finished run folder, in eval mode, with its class names and input
    normalisation: a :class:`dscl.engine.trained.TrainedClassifier`; ``model(images)`` -> logits."""
    from .engine.trained import load as load_run

    return load_run(run_dir, device)
