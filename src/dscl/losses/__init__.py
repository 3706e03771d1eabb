"""The two losses of the method, each as a function and as a module, and the logit-adjustment
baselines."""

from .decoupled_supcon import (DecoupledSupConLoss, alpha_from_beta, decoupled_supcon_loss, effective_number_weights,
                               key_probability)
from .logit_adjusted import LogitAdjustedLoss, log_prior, logit_adjusted_loss, posthoc_adjust
from .patch_distillation import PatchDistillationLoss, distillation_signals, patch_distillation_loss

__all__ = [
    "DecoupledSupConLoss",
    "LogitAdjustedLoss",
    "PatchDistillationLoss",
    "alpha_from_beta",
    "decoupled_supcon_loss",
    "distillation_signals",
    "effective_number_weights",
    "key_probability",
    "log_prior",
    "logit_adjusted_loss",
    "patch_distillation_loss",
    "posthoc_adjust",
]
