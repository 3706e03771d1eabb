"""The two losses of the method, each as a function and as a module."""

from .decoupled_supcon import (DecoupledSupConLoss, alpha_from_beta, decoupled_supcon_loss, effective_number_weights,
                               key_probability)
from .patch_distillation import PatchDistillationLoss, patch_distillation_loss

__all__ = [
    "DecoupledSupConLoss",
    "PatchDistillationLoss",
    "alpha_from_beta",
    "decoupled_supcon_loss",
    "effective_number_weights",
    "key_probability",
    "patch_distillation_loss",
]
