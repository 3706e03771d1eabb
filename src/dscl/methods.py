"""The methods a run can train, each described once.

A :class:`Method` says what its two stages are: which network stage 1 trains (a classifier end
to end, or the momentum-contrast encoder with its labelled queue), which loss it minimises, and
whether a linear classifier is then trained on the frozen encoder (stage 2). The engine, the
sweep and the analyses read these traits; nothing else tests a method's name. A new method is
one entry in :data:`REGISTRY`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    contrastive: bool  # stage 1 trains the momentum-contrast encoder + queue; else a classifier end to end
    decoupled: bool = False  # the contrastive loss is DSCL (reads pretrain.alpha / beta); else SCL
    patches: bool = False  # the patch term (PBSD, or its ablations) is added to the contrastive loss
    logit_adjusted: bool = False  # stage-1 cross-entropy on logits + tau * log(prior) (reads pretrain.la_tau)
    stage2: bool = True  # a linear classifier is trained on the frozen encoder; else stage 1's classifier predicts

    @property
    def stage1(self) -> str:
        """What stage 1 trains; two methods with the same stage 1 can share its checkpoint."""
        if self.contrastive:
            return f"{'dscl' if self.decoupled else 'scl'}{'+pbsd' if self.patches else ''}"
        return "ce-la" if self.logit_adjusted else "ce"


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("ce", "cross-entropy end to end (the plain baseline)", contrastive=False, stage2=False),
    Method("ce-la", "logit-adjusted cross-entropy end to end (Menon et al. 2021; Balanced Softmax at tau 1)",
           contrastive=False, logit_adjusted=True, stage2=False),
    Method("crt", "classifier re-training (Kang et al. 2020): cross-entropy end to end, then stage 2 on its "
           "frozen features", contrastive=False),
    Method("scl", "supervised contrastive learning with a momentum queue (the paper's baseline)", contrastive=True),
    Method("dscl", "decoupled supervised contrastive learning", contrastive=True, decoupled=True),
    Method("scl+pbsd", "SCL + patch-based self distillation", contrastive=True, patches=True),
    Method("dscl+pbsd", "DSCL + patch-based self distillation (the paper's method)", contrastive=True,
           decoupled=True, patches=True),
)}
METHODS = tuple(REGISTRY)  # the names, in the order the docs list them


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"method: must be one of {', '.join(METHODS)}, got {name!r}") from None
