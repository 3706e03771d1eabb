"""``compile: true``: the compiled stage-1 step computes what the eager one does.

The encoders' common entry point (``forward_features``, or ``expert_maps`` with experts) is
compiled, so the query view, the patch crops and the keys all run compiled. The tests use
``torch.compile``'s ``aot_eager`` backend: the same graph capture and functionalisation as the
default backend, without its minutes of C++ code generation on a CPU.
"""

import pytest
import torch

from dscl.config import load_config
from dscl.engine.pretrain import build_stage1_model, prepare_model, stage1_losses

SMALL = ["pretrain.batch_size=4", "pretrain.queue_size=16", "pretrain.num_patches=2", "pretrain.key_bn_groups=2"]


def step(experts: int, compiled: bool):
    """Loss and gradients of one DSCL + PBSD step from fixed weights, batch and key shuffle."""
    cfg = load_config(None, ["method=dscl+pbsd", f"compile={str(compiled).lower()}", f"model.experts={experts}",
                             *SMALL])
    torch.manual_seed(0)
    model = prepare_model(build_stage1_model(cfg, num_classes=3), cfg)
    g = torch.Generator().manual_seed(1)
    views = (torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g),
             torch.randn(4, 2, 3, 16, 16, generator=g),
             torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 4.0, 30.0, 28.0]]).expand(4, 2, 4).contiguous())
    torch.manual_seed(2)  # the key shuffle
    loss, _, _ = stage1_losses(model, (views, torch.tensor([0, 1, 2, 0])), cfg, torch.device("cpu"))
    loss.backward()
    return model, loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("experts", [1, 3])
def test_compiled_pbsd_step_equals_the_eager_one(experts, monkeypatch):
    compiled_names, real_compile = [], torch.compile

    def compile_(fn, **kwargs):
        compiled_names.append(fn.__name__)
        return real_compile(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    eager, loss, grads = step(experts, compiled=False)
    assert compiled_names == []
    compiled, compiled_loss, compiled_grads = step(experts, compiled=True)
    assert compiled_names == 2 * ["forward_features" if experts == 1 else "expert_maps"]  # query and key encoders
    torch.testing.assert_close(compiled_loss, loss)
    for a, b in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
