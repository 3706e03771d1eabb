"""dscl: Decoupled Contrastive Learning (DSCL + PBSD) for long-tailed image recognition.

Sub-packages follow the method: ``dscl.data`` (datasets, long-tailed construction, samplers,
views and patches), ``dscl.models`` (backbones, heads, the momentum-contrast model and its
queue), ``dscl.losses`` (DSCL and PBSD), ``dscl.engine`` (both training stages, evaluation,
checkpoints, distributed helpers) and the command-line interface ``dscl.cli``.
"""

from .errors import CheckpointError, ConfigError, DataError, DSCLError, NumericalError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DSCLError", "DataError", "NumericalError", "__version__"]
