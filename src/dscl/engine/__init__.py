"""Training loops of both stages, evaluation, checkpoints and the distributed helpers."""

from .distributed import Runtime, setup, teardown
from .evaluate import accuracy_report, predict
from .runner import STAGES, load_data, run

__all__ = ["Runtime", "STAGES", "accuracy_report", "load_data", "predict", "run", "setup", "teardown"]
