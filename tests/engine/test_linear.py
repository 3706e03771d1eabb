import torch

from dscl.config import load_config
from dscl.engine.distributed import Runtime
from dscl.engine.linear import train_linear
from dscl.engine.rundir import RunDir
from dscl.engine.runner import load_data
from dscl.models import build_backbone


def test_linear_stage_leaves_backbone_bitwise_unchanged(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    splits = load_data(cfg)
    backbone = build_backbone("resnet32")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    run = RunDir(tmp_path)
    run.prepare(cfg.to_dict(), resume=False)
    model, _ = train_linear(cfg, splits, Runtime(0, 1, torch.device("cpu")), run, backbone, resume=False)
    after = model.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert not model.backbone.training
    assert not torch.equal(model.fc.weight, torch.zeros_like(model.fc.weight))
    assert (tmp_path / "checkpoints" / "linear_best.pt").is_file()
