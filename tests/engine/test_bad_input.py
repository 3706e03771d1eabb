"""Bad input, end to end through ``dscl run`` on tiny image folders written to tmp_path.

Every case must end with exit code 2 and one ``dscl: error:`` line naming the file, line or key,
no traceback, and an output folder without results.json or a checkpoint that claims to be
complete. With ``data.skip_bad_images`` a corrupt image is dropped instead and the run finishes.
"""

import errno
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dscl.cli import main
from dscl import files
from dscl.engine import checkpoint as ckpt
from dscl.errors import CheckpointError

CLASSES = ("c0", "c1", "c2")


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine's cores are shared: one intra-op thread makes a tiny run ~10x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image(path, seed: int, size: int = 8, fmt: str | None = None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def image_folder(root, train_per_class: int = 2, test_per_class: int = 2):
    """root/{train,test}/c{0,1,2}/: PNG training images, JPEG test images, 8x8.

    Six training images: fewer than the batch of 8, so the first step of stage 1 reads them all.
    """
    for c, name in enumerate(CLASSES):
        for i in range(train_per_class):
            image(root / "train" / name / f"{i}.png", 10 * c + i)
        for i in range(test_per_class):
            image(root / "test" / name / f"{i}.jpg", 100 + 10 * c + i)
    return root


def corrupt(path):
    """Random bytes under an image name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 400, np.uint8).tobytes())
    return path


def truncated_jpeg(path):
    """A real JPEG cut in half: the header opens, the pixels do not decode."""
    image(path, 3, size=32, fmt="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def tiny(tiny_overrides, root, *extra):
    """The conftest's tiny budgets on an image folder (its data.synthetic_* keys are unused)."""
    return [*tiny_overrides, "data.name=imagefolder", f"data.root={root}", "data.imbalance_ratio=null", *extra]


def sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


def run_cli(out, overrides, config=None):
    args = ["run", "--out", str(out)] + (["--config", str(config)] if config else [])
    return main(args + sets(overrides))


def assert_refused(rc, err: str, out, *words):
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.count("dscl: error:") == 1, err
    message = err.split("dscl: error:", 1)[1]
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert not (out / "results.json").exists()
    for path in sorted((out / "checkpoints").glob("*.pt")):
        assert not torch.load(path, map_location="cpu", weights_only=False).get("complete"), path


# ---------------------------------------------------------------- bad images and folders


def bad_train_image(root):
    image_folder(root)
    corrupt(root / "train" / "c1" / "bad.jpg")
    return [], ["bad.jpg", "cannot read image"]


def cut_train_image(root):
    image_folder(root)
    truncated_jpeg(root / "train" / "c2" / "cut.jpg")
    return [], ["cut.jpg", "cannot read image"]


def missing_root(root):
    return [f"data.root={root / 'nowhere'}"], ["nowhere", "root folder not found"]


def empty_class_folder(root):
    image_folder(root)
    (root / "train" / "c3").mkdir()
    return [], [str(root / "train" / "c3"), "no training image"]


def class_folder_without_images(root):
    image_folder(root)
    (root / "train" / "c3").mkdir()
    (root / "train" / "c3" / "notes.txt").write_text("not an image")
    return [], [str(root / "train" / "c3"), "no training image"]


def empty_data_set(root):
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    return [], [str(root / "train"), "no class folders"]


def no_test_images(root):
    image_folder(root, test_per_class=0)
    for name in CLASSES:
        (root / "test" / name).mkdir(parents=True)
    return [], [str(root / "test"), "no image"]


@pytest.mark.parametrize("make", [bad_train_image, cut_train_image, missing_root, empty_class_folder,
                                  class_folder_without_images, empty_data_set, no_test_images])
def test_bad_image_folder(tmp_path, tiny_overrides, capsys, make):
    root = tmp_path / "data"
    extra, words = make(root)
    rc = run_cli(tmp_path / "run", tiny(tiny_overrides, root, *extra))
    assert_refused(rc, capsys.readouterr().err, tmp_path / "run", *words)


def test_corrupt_test_image_fails_before_training(tmp_path, tiny_overrides, capsys):
    """Validation and test images are decoded before training: a bad one stops the run at once."""
    root = image_folder(tmp_path / "data")
    corrupt(root / "test" / "c0" / "bad.jpg")
    out = tmp_path / "run"
    rc = run_cli(out, tiny(tiny_overrides, root, "pretrain.epochs=1", "linear.epochs=1"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "bad.jpg" in err
    assert not (out / "results.json").exists()
    assert not (out / "checkpoints").exists()  # stopped before stage 1 began


@pytest.mark.parametrize("method", ["dscl+pbsd", "ce"])
def test_skip_bad_images_completes(tmp_path, tiny_overrides, method):
    root = image_folder(tmp_path / "data")
    corrupt(root / "train" / "c1" / "bad.jpg")
    truncated_jpeg(root / "test" / "c2" / "cut.jpg")
    out = tmp_path / "run"
    rc = run_cli(out, tiny(tiny_overrides, root, "data.skip_bad_images=true", f"method={method}",
                           "pretrain.epochs=1", "linear.epochs=1"))
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["bad_images_skipped"] == 2
    assert results["train_counts"] == [2, 2, 2] and results["test_images"] == 6


# ---------------------------------------------------------------- split files (ImageNet-LT format)


def lt_root(root, lines):
    """An ImageNet-LT layout with three real images; ImageNet-LT needs all 1000 classes."""
    for c, name in enumerate(CLASSES):
        image(root / "train" / name / "a.png", c)
    (root / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    (root / "ImageNet_LT_test.txt").write_text("train/c0/a.png 0\ntrain/c1/a.png 1\n")
    return root


def full_lines():
    return [f"train/{CLASSES[c % 3]}/a.png {c}" for c in range(1000)]


@pytest.mark.parametrize("line, words", [
    ("train/c0/a.png 4 extra", ["ImageNet_LT_train.txt, line 5", "got 3 field(s)"]),
    ("train/c0/a.png", ["ImageNet_LT_train.txt, line 5", "got 1 field(s)"]),
    ("train/c0/a.png four", ["ImageNet_LT_train.txt, line 5", "label 'four' is not an integer"]),
    ("train/c0/a.png 1000", ["ImageNet_LT_train.txt, line 5", "label 1000 out of range [0, 1000)"]),
    ("train/c0/a.png -1", ["ImageNet_LT_train.txt, line 5", "out of range"]),
    ("train/c9/gone.png 4", ["ImageNet_LT_train.txt, line 5", "image file not found", "gone.png"]),
])
def test_bad_split_file_line(tmp_path, tiny_overrides, capsys, line, words):
    lines = full_lines()
    lines[4] = line
    root = lt_root(tmp_path / "data", lines)
    rc = run_cli(tmp_path / "run", tiny(tiny_overrides, root, "data.name=imagenet-lt"))
    assert_refused(rc, capsys.readouterr().err, tmp_path / "run", *words)


def test_split_file_with_too_few_classes(tmp_path, tiny_overrides, capsys):
    root = lt_root(tmp_path / "data", full_lines()[:3])  # labels 0..2 of the 1000
    rc = run_cli(tmp_path / "run", tiny(tiny_overrides, root, "data.name=imagenet-lt"))
    assert_refused(rc, capsys.readouterr().err, tmp_path / "run", "ImageNet_LT_train.txt", "class 3")


def test_split_file_missing(tmp_path, tiny_overrides, capsys):
    root = lt_root(tmp_path / "data", full_lines())
    os.remove(root / "ImageNet_LT_test.txt")
    rc = run_cli(tmp_path / "run", tiny(tiny_overrides, root, "data.name=imagenet-lt"))
    assert_refused(rc, capsys.readouterr().err, tmp_path / "run", "ImageNet_LT_test.txt")


# ---------------------------------------------------------------- bad configuration


def test_mistyped_key_in_recipe(tmp_path, tiny_overrides, capsys):
    root = image_folder(tmp_path / "data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: dscl\npretrain:\n  epohcs: 2\n  lr: 0.1\n")
    rc = run_cli(tmp_path / "run", tiny(tiny_overrides, root), config=recipe)
    assert_refused(rc, capsys.readouterr().err, tmp_path / "run", "recipe.yaml", "pretrain.epohcs",
                   "did you mean pretrain.epochs")


@pytest.mark.parametrize("override, words", [
    ("pretrain.epochs=-1", ["pretrain.epochs", ">= 0"]),
    ("linear.epochs=-3", ["linear.epochs", ">= 0"]),
    ("pretrain.alpha=1.5", ["pretrain.alpha", "[0, 1]"]),
    ("pretrain.alpha=-0.1", ["pretrain.alpha", "[0, 1]"]),
    ("pretrain.queue_size=4", ["pretrain.queue_size", "batch size (8)"]),
    ("pretrain.epochs=two", ["pretrain.epochs", "expected int"]),
    ("data.nmae=imagefolder", ["data.nmae"]),
    ("data.roott=x", ["data.roott", "did you mean data.root"]),
])
def test_bad_value(tmp_path, tiny_overrides, capsys, override, words):
    root = image_folder(tmp_path / "data")
    rc = run_cli(tmp_path / "run", tiny(tiny_overrides, root, override))
    assert_refused(rc, capsys.readouterr().err, tmp_path / "run", *words)


def test_bad_value_in_recipe(tmp_path, tiny_overrides, capsys):
    root = image_folder(tmp_path / "data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("pretrain:\n  alpha: 2.0\n")
    rc = run_cli(tmp_path / "run", tiny(tiny_overrides, root), config=recipe)
    assert_refused(rc, capsys.readouterr().err, tmp_path / "run", "pretrain.alpha")


# Values out of range that once reached torch and failed there with a traceback: each must be
# refused up front with one message naming the key.
UNCHECKED = [
    "pretrain.weight_decay=-1", "pretrain.momentum=-1", "linear.weight_decay=-1", "linear.momentum=-0.5",
    "eval_batch_size=0", "data.image_size=-5", "model.feature_dim=0", "pretrain.steps_per_epoch=-1",
    "linear.steps_per_epoch=-1", "pretrain.patch_size=-1", "pretrain.crop_scale=[0.9,0.1]", "device=foo",
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("override", UNCHECKED)
def test_unchecked_value(tmp_path, tiny_overrides, capsys, override):
    root = image_folder(tmp_path / "data")
    rc = run_cli(tmp_path / "run", tiny(tiny_overrides, root, override, "pretrain.epochs=1", "linear.epochs=1"))
    assert_refused(rc, capsys.readouterr().err, tmp_path / "run", override.split("=")[0])


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    # Bug caught: a failed write that leaves a truncated checkpoint or a temp file behind, or a
    # raw OSError traceback instead of a message saying the disk is full.
    path = tmp_path / "checkpoints" / "pretrain_last.pt"
    ckpt.save_checkpoint(path, {"format": 1, "epoch": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(CheckpointError, match="disk is full.*previous pretrain_last.pt is unchanged"):
        ckpt.save_checkpoint(path, {"format": 1, "epoch": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["pretrain_last.pt"]


def test_resume_follows_moved_data_and_refuses_other_data(tmp_path, tiny_overrides, capsys):
    # Bug caught: data.root was part of a run's identity, so a run could not go on after its
    # data moved (another machine, another mount), nor a sweep reuse a stage 1 trained from
    # another path to the same images; moving must still not let other images in.
    first, out = image_folder(tmp_path / "first"), tmp_path / "run"
    tiny_overrides += ["pretrain.epochs=1", "linear.epochs=1"]
    assert main(["pretrain", "--out", str(out), *sets(tiny(tiny_overrides, first))]) == 0
    stage1 = (out / "checkpoints" / "pretrain.pt").read_bytes()
    moved = tmp_path / "moved"
    first.rename(moved)
    assert main(["run", "--out", str(out), "--resume", *sets(tiny(tiny_overrides, moved))]) == 0, \
        capsys.readouterr().err
    assert (out / "results.json").is_file()
    assert (out / "checkpoints" / "pretrain.pt").read_bytes() == stage1  # stage 1 went on, not again

    other = image_folder(tmp_path / "other", train_per_class=3)
    rc = main(["linear", "--out", str(out), *sets(tiny(tiny_overrides, other))])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "belongs to a different run" in err and "3 classes, 6 training images -> 3 classes, 9" in err, err
