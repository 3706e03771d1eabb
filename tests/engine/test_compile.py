"""``compile: true``: the compiled stage-1 step computes what the eager one does.

The encoders' common entry point (``forward_features``, or ``expert_maps`` with experts) is
compiled, so the query view, the patch crops and the keys all run compiled. The tests use
``torch.compile``'s ``aot_eager`` backend: the same graph capture and functionalisation as the
default backend, without its minutes of C++ code generation on a CPU.
"""

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from dscl.config import load_config
from dscl.engine import pretrain
from dscl.engine.pretrain import build_stage1_model, compiled_step, optimise, prepare_model, stage1_losses
from dscl.engine.step import check_can_compile
from dscl.errors import ConfigError
from dscl.models.backbones import CifarResNet

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


# ``compile: step``: the whole stage-1 step (losses, backward, optimiser's step, enqueue) compiled.
# Not bit-exact: compiled, the optimiser takes the learning rate as a tensor (a float would
# recompile at every new rate), so SGD's update is grad * -lr, rounded, then an add, where eager SGD
# fuses the two (add with alpha=-lr). The first loss is equal; after that the float32 rounding
# carries over: measured, at most 1.2e-7 in a weight or statistic and 9e-6 in a loss of 5 to 6
# after three steps, well inside this tolerance.
STEP_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
RATES = (0.1, 0.05, 0.02)  # a new learning rate at each step, as under the warm-up / cosine schedule


def aot_eager_compile(monkeypatch) -> list[str]:
    """torch.compile with the aot_eager backend; returns the names of the functions compiled."""
    compiled_names, real_compile = [], torch.compile

    def compile_(fn, **kwargs):
        compiled_names.append(fn.__name__)
        return real_compile(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    return compiled_names


def three_steps(method: str, compiled: bool, monkeypatch):
    """Losses of three stage-1 steps from fixed weights, views and seeds, and the model after them
    (on a ResNet-8, the ResNet-32 of the recipes with one block per stage: the same layers, and a
    graph five times smaller to compile)."""
    monkeypatch.setattr(pretrain, "build_backbone", lambda name, **options: CifarResNet(8))
    cfg = load_config(None, [f"method={method}", f"compile={'step' if compiled else 'false'}", *SMALL])
    torch.manual_seed(0)
    model = prepare_model(build_stage1_model(cfg, num_classes=3), cfg)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=RATES[0], momentum=0.9,
                                weight_decay=5e-4)
    device = torch.device("cpu")
    step = compiled_step(model, optimizer, cfg, device, num_classes=3) if compiled else None
    g = torch.Generator().manual_seed(1)
    losses = []
    for n, rate in enumerate(RATES):
        images = (torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g),
                  torch.randn(4, 2, 3, 16, 16, generator=g),
                  torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 4.0, 30.0, 28.0]]).expand(4, 2, 4).contiguous())
        views = images if method != "ce" else images[0]
        batch = (views, torch.tensor([0, 1, 2, n % 3]))
        for group in optimizer.param_groups:
            group["lr"] = rate
        torch.manual_seed(10 + n)  # the key shuffle
        if compiled:  # the first step compiles, the second again (the optimiser's state is there now); a new rate
            # alone recompiles nothing
            with torch.compiler.set_stance("fail_on_recompile" if n == len(RATES) - 1 else "default"):
                loss, _ = step(batch)
        else:
            loss, _, keys = stage1_losses(model, batch, cfg, device, num_classes=3)
            optimise(model, optimizer, loss, keys, batch[1])
        assert [group["lr"] for group in optimizer.param_groups] == [rate]  # floats again after the call
        losses.append(loss.detach())
    return model, losses


@pytest.mark.parametrize("method", ["dscl+pbsd", "ce"])
def test_compiled_whole_step_equals_the_eager_one(method, monkeypatch):
    torch._dynamo.reset()  # no compiled code nor recompilation count left by another test
    compiled_names = aot_eager_compile(monkeypatch)
    eager, losses = three_steps(method, compiled=False, monkeypatch=monkeypatch)
    assert compiled_names == []
    graphs = counters["stats"]["unique_graphs"]
    compiled, compiled_losses = three_steps(method, compiled=True, monkeypatch=monkeypatch)
    assert compiled_names == ["train_step"]  # the step alone, not the encoders as well
    assert counters["stats"]["unique_graphs"] > graphs  # and it ran compiled, not eager after a failed capture
    for a, b in zip(compiled_losses, losses, strict=True):
        torch.testing.assert_close(a, b, **STEP_TOLERANCE)
    state, eager_state = compiled.state_dict(), eager.state_dict()
    assert state.keys() == eager_state.keys()
    for name, value in eager_state.items():  # parameters, BN statistics, and the queue's keys, labels and pointer
        torch.testing.assert_close(state[name], value, **STEP_TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
    if method != "ce":
        assert int(state["queue.ptr"]) == 12 and (state["queue.labels"] >= 0).sum() == 12


def test_compile_step_is_a_config_choice():
    assert load_config(None, ["compile=step"]).compile == "step"
    assert load_config(None, ["compile=true"]).compile is True
    assert load_config(None, []).compile is False
    with pytest.raises(ConfigError, match="compile: must be true, false or step, got 'steps'"):
        load_config(None, ["compile=steps"])


def test_compile_is_refused_where_this_pytorch_cannot_compile(monkeypatch):
    cfg, cpu = load_config(None, ["compile=step"]), torch.device("cpu")
    check_can_compile(load_config(None, []), cpu)  # compile: false needs nothing
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="compile: 'step' on a CPU needs a C\\+\\+ compiler.*compile: false"):
        check_can_compile(cfg, cpu)
    monkeypatch.delattr(torch, "compile")
    with pytest.raises(ConfigError, match="compile: True needs torch.compile"):
        check_can_compile(load_config(None, ["compile=true"]), torch.device("cuda"))
