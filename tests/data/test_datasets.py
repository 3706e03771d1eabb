"""build_splits on tiny data written to tmp_path: layouts, LT subsampling, every error case."""

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

from dscl.data import (DATASET_NAMES, DataSplits, TransformedDataset, build_splits,
                       longtail_counts)
from dscl.errors import DataError


def png(path, value=0, size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), (value % 256, 40, 90)).save(path)
    return path


def ldam_select(per_class_files, counts):
    """Reference: np.random.seed(0), per class in label order shuffle and keep the first n_c."""
    np.random.seed(0)
    chosen = []
    for files, n in zip(per_class_files, counts):
        idx = np.arange(len(files))
        np.random.shuffle(idx)
        chosen.extend(files[i] for i in idx[:n])
    return chosen


def make_folder(root, train_sizes, test_per_class=2, names=None, val=False):
    names = names or [f"c{i}" for i in range(len(train_sizes))]
    for c, (name, n) in enumerate(zip(names, train_sizes)):
        for i in range(n):
            png(os.path.join(root, "train", name, f"{i:04d}.png"), c)
        for i in range(test_per_class):
            png(os.path.join(root, "test", name, f"t{i}.png"), c)
            if val:
                png(os.path.join(root, "val", name, f"v{i}.png"), c)
    return names


# ---------------------------------------------------------------- image folder


def test_imagefolder_classes_files_and_items(tmp_path):
    root = str(tmp_path)
    make_folder(root, [3, 2, 1], names=["zebra", "ant", "moth"])
    png(os.path.join(root, "train", "ant", "X.PNG"), 7)  # upper-case extension counts
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    splits = build_splits("imagefolder", root)
    assert isinstance(splits, DataSplits)
    assert splits.classes == ["ant", "moth", "zebra"] and splits.num_classes == 3
    assert splits.train_counts == [3, 1, 3] and splits.val is None and len(splits.test) == 6
    names = [os.path.relpath(p, root) for p in splits.train.paths]
    assert names[:3] == ["train/ant/0000.png", "train/ant/0001.png", "train/ant/X.PNG"]
    img, label = splits.train[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 0
    assert splits.image_size == 8 and splits.bad_files == []


def test_imagefolder_longtail_matches_reference(tmp_path):
    root = str(tmp_path)
    names = make_folder(root, [20] * 5, test_per_class=1)
    splits = build_splits("imagefolder", root, imbalance_ratio=10)
    counts = longtail_counts(20, 5, 10)
    assert splits.train_counts == counts == [20, 11, 6, 3, 2]
    files = [sorted(os.listdir(os.path.join(root, "train", n))) for n in names]
    per_class = [[os.path.join(root, "train", n, f) for f in fs] for n, fs in zip(names, files)]
    assert splits.train.paths == ldam_select(per_class, counts)


def test_imagefolder_validation_held_out(tmp_path):
    root = str(tmp_path)
    make_folder(root, [20] * 5, test_per_class=1)
    splits = build_splits("imagefolder", root, imbalance_ratio=10, val_per_class=2, seed=4)
    assert np.bincount(splits.val.targets).tolist() == [2] * 5
    assert splits.train_counts == [18, 11, 6, 3, 2]
    assert not set(splits.val.paths) & set(splits.train.paths)
    with_folder = tmp_path / "other"
    make_folder(str(with_folder), [3, 3], val=True)
    assert len(build_splits("imagefolder", str(with_folder), val_per_class=1).val) == 4


@pytest.mark.parametrize("split", ["val", "test"])
def test_imagefolder_eval_class_unknown_to_train(tmp_path, split):
    make_folder(str(tmp_path), [2, 2], val=True)
    png(str(tmp_path / split / "stranger" / "a.png"))
    with pytest.raises(DataError, match=f"{split}/stranger"):
        build_splits("imagefolder", str(tmp_path))


def test_imagefolder_structure_errors(tmp_path):
    make_folder(str(tmp_path), [2, 2])
    os.makedirs(tmp_path / "train" / "empty")
    (tmp_path / "train" / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="train/empty"):
        build_splits("imagefolder", str(tmp_path))
    other = tmp_path / "notest"
    png(str(other / "train" / "a" / "x.png"))
    with pytest.raises(DataError, match="test"):
        build_splits("imagefolder", str(other))
    with pytest.raises(DataError, match="missing_root"):
        build_splits("imagefolder", str(tmp_path / "missing_root"))


def test_imagefolder_longtail_that_empties_a_class(tmp_path):
    make_folder(str(tmp_path), [3, 3, 3], test_per_class=1)
    with pytest.raises(DataError, match=r"class 1 \(c1\) has no training image"):
        build_splits("imagefolder", str(tmp_path), imbalance_ratio=10)


# ---------------------------------------------------------------- corrupt images


def corrupt_png(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not really an image")
    return path


def truncated_jpeg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("make_bad, name", [(corrupt_png, "broken.png"),
                                            (truncated_jpeg, "cut.jpg")])
def test_bad_image_raises_or_is_skipped(tmp_path, make_bad, name):
    make_folder(str(tmp_path), [2, 2])
    bad = make_bad(str(tmp_path / "train" / "c1" / name))
    splits = build_splits("imagefolder", str(tmp_path))
    index = splits.train.paths.index(bad)
    with pytest.raises(DataError, match=name):
        splits.train[index]
    skipped = build_splits("imagefolder", str(tmp_path), skip_bad_images=True)
    assert skipped.bad_files == [bad]
    assert skipped.train_counts == [2, 2] and bad not in skipped.train.paths
    for i in range(len(skipped.train)):
        skipped.train[i]


def test_skipping_the_only_image_of_a_class(tmp_path):
    make_folder(str(tmp_path), [2, 1])
    os.remove(tmp_path / "train" / "c1" / "0000.png")
    corrupt_png(str(tmp_path / "train" / "c1" / "only.png"))
    with pytest.raises(DataError, match="class 1 .*after dropping 1 unreadable"):
        build_splits("imagefolder", str(tmp_path), skip_bad_images=True)


# ---------------------------------------------------------------- ImageNet-LT / Places-LT


def write_split(root, name, lines):
    with open(os.path.join(root, name), "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture
def lt_root(tmp_path):
    """A valid ImageNet-LT layout: 1000 classes whose lines share a few small images."""
    for i in range(3):
        png(str(tmp_path / "train" / f"n{i}" / "a.png"), i)
    png(str(tmp_path / "val" / "v.png"))
    lines = [f"train/n{c % 3}/a.png {c}" for c in range(1000)]
    write_split(str(tmp_path), "ImageNet_LT_train.txt", lines)
    write_split(str(tmp_path), "ImageNet_LT_test.txt", ["val/v.png 5", "val/v.png 999"])
    return tmp_path


def test_split_files_read(lt_root):
    splits = build_splits("imagenet-lt", str(lt_root))
    assert splits.num_classes == 1000 and len(splits.classes) == 1000
    assert splits.train_counts == [1] * 1000 and splits.val is None
    assert splits.test.targets == [5, 999] and splits.image_size == 224
    img, label = splits.train[4]
    assert label == 4 and img.size == (8, 8)
    write_split(str(lt_root), "ImageNet_LT_val.txt", ["val/v.png 3"])
    assert build_splits("imagenet-lt", str(lt_root)).val.targets == [3]


@pytest.mark.parametrize("line, pattern", [
    ("train/n0/a.png 4 extra", "3 field"),
    ("train/n0/a.png", "1 field"),
    ("train/n0/a.png four", "'four' is not an integer"),
    ("train/n0/a.png 1000", r"1000 out of range \[0, 1000\)"),
    ("train/n0/a.png -1", "out of range"),
    ("train/n9/missing.png 4", "not found: .*missing.png"),
])
def test_split_file_line_errors(lt_root, line, pattern):
    path = str(lt_root / "ImageNet_LT_train.txt")
    lines = open(path).read().splitlines()
    lines[6] = line  # line 7 of the file
    write_split(str(lt_root), "ImageNet_LT_train.txt", lines)
    with pytest.raises(DataError, match=f"ImageNet_LT_train.txt, line 7: .*{pattern}"):
        build_splits("imagenet-lt", str(lt_root))


def test_split_file_class_without_training_image(lt_root):
    path = str(lt_root / "ImageNet_LT_train.txt")
    lines = open(path).read().splitlines()
    write_split(str(lt_root), "ImageNet_LT_train.txt", lines[:-1])
    with pytest.raises(DataError, match="ImageNet_LT_train.txt: class 999 .*no training image"):
        build_splits("imagenet-lt", str(lt_root))
    write_split(str(lt_root), "ImageNet_LT_train.txt", [])
    with pytest.raises(DataError, match="ImageNet_LT_train.txt: no entries"):
        build_splits("imagenet-lt", str(lt_root))


def test_split_file_missing_and_places(lt_root):
    os.remove(lt_root / "ImageNet_LT_test.txt")
    with pytest.raises(DataError, match="ImageNet_LT_test.txt"):
        build_splits("imagenet-lt", str(lt_root))
    write_split(str(lt_root), "Places_LT_train.txt", [f"val/v.png {c}" for c in range(365)])
    write_split(str(lt_root), "Places_LT_test.txt", ["val/v.png 364"])
    places = build_splits("places-lt", str(lt_root))
    assert places.num_classes == 365 and places.train_counts == [1] * 365


def test_split_json_alternative(lt_root):
    os.remove(lt_root / "ImageNet_LT_train.txt")
    entries = [{"path": f"train/n{c % 3}/a.png", "label": c} for c in range(1000)]
    (lt_root / "ImageNet_LT_train.json").write_text(json.dumps(entries))
    assert build_splits("imagenet-lt", str(lt_root)).train_counts == [1] * 1000
    entries[2]["label"] = "x"
    (lt_root / "ImageNet_LT_train.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"ImageNet_LT_train.json, entry \[2\].label"):
        build_splits("imagenet-lt", str(lt_root))
    entries[2] = {"file": "a.png", "label": 2}
    (lt_root / "ImageNet_LT_train.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry \[2\]: expected an object with keys"):
        build_splits("imagenet-lt", str(lt_root))
    (lt_root / "ImageNet_LT_train.json").write_text('[{"path": "a.png",\n "label": }]')
    with pytest.raises(DataError, match="ImageNet_LT_train.json, line 2: invalid JSON"):
        build_splits("imagenet-lt", str(lt_root))


# ---------------------------------------------------------------- iNaturalist 2018


def coco(images, annotations, cat_ids=(10, 11, 12)):
    return {"images": [{"id": i, "file_name": f} for i, f in images],
            "annotations": [{"id": k, "image_id": i, "category_id": c}
                            for k, (i, c) in enumerate(annotations)],
            "categories": [{"id": c, "name": f"species{c}"} for c in cat_ids]}


@pytest.fixture
def inat_root(tmp_path):
    for name in ("a", "b", "c", "d"):
        png(str(tmp_path / "train_val2018" / f"{name}.png"))
    train = coco([(1, "train_val2018/a.png"), (2, "train_val2018/b.png"),
                  (3, "train_val2018/c.png")], [(1, 12), (2, 10), (3, 11)])
    val = coco([(7, "train_val2018/d.png")], [(7, 11)])
    (tmp_path / "train2018.json").write_text(json.dumps(train))
    (tmp_path / "val2018.json").write_text(json.dumps(val))
    return tmp_path


def test_inat_reads_coco_json(inat_root):
    splits = build_splits("inat2018", str(inat_root))
    assert splits.classes == ["species10", "species11", "species12"]
    assert splits.train.targets == [2, 0, 1] and splits.test.targets == [1]
    assert splits.val is None and splits.num_classes == 3


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d["annotations"][1].update(category_id=99),
     r"train2018.json: annotations\[1\].category_id = 99"),
    (lambda d: d["annotations"][0].update(image_id=42),
     r"train2018.json: annotations\[0\].image_id = 42"),
    (lambda d: d["images"][2].update(file_name="train_val2018/zzz.png"),
     r"train2018.json: images\[2\].file_name: image file not found"),
    (lambda d: d.pop("annotations"), "train2018.json: key 'annotations'"),
    (lambda d: d["annotations"].pop(2), "train2018.json: class 1 .*no training image"),
])
def test_inat_errors(inat_root, edit, pattern):
    doc = json.loads((inat_root / "train2018.json").read_text())
    edit(doc)
    (inat_root / "train2018.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=pattern):
        build_splits("inat2018", str(inat_root))


# ---------------------------------------------------------------- CIFAR-LT


def fake_cifar(num_classes):
    """Stand-in for torchvision's CIFAR classes: tiny images, CIFAR's label layout."""

    class FakeCIFAR:
        def __init__(self, root, train=True, download=False):
            per_class = (5000 if num_classes == 10 else 500) if train else 10
            rng = np.random.default_rng(1 if train else 2)
            self.targets = rng.permutation(np.repeat(np.arange(num_classes), per_class)).tolist()
            self.data = rng.integers(0, 256, (len(self.targets), 1, 1, 3), np.uint8)
            self.classes = [f"k{c}" for c in range(num_classes)]

    return FakeCIFAR


@pytest.mark.parametrize("name, attr, num_classes, rho, total", [
    ("cifar10-lt", "CIFAR10", 10, 100, 12406), ("cifar10-lt", "CIFAR10", 10, 10, 20431),
    ("cifar100-lt", "CIFAR100", 100, 100, 10847), ("cifar100-lt", "CIFAR100", 100, 50, 12608),
])
def test_cifar_lt_construction(tmp_path, monkeypatch, name, attr, num_classes, rho, total):
    fake = fake_cifar(num_classes)
    monkeypatch.setattr(torchvision.datasets, attr, fake)
    splits = build_splits(name, str(tmp_path), imbalance_ratio=rho)
    full = fake(str(tmp_path))
    y = np.array(full.targets)
    per_class = [np.where(y == c)[0].tolist() for c in range(num_classes)]
    chosen = ldam_select(per_class, longtail_counts(len(per_class[0]), num_classes, rho))
    assert len(splits.train) == total
    assert np.array_equal(splits.train.data, full.data[chosen])
    assert splits.train.targets == y[chosen].tolist()
    assert len(splits.test) == 10 * num_classes and splits.val is None
    assert splits.image_size == 32


def test_cifar_validation_from_left_out_images(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar(10))
    plain = build_splits("cifar10-lt", str(tmp_path))
    splits = build_splits("cifar10-lt", str(tmp_path), val_per_class=20, seed=1)
    assert np.bincount(splits.val.targets).tolist() == [20] * 10
    assert splits.train_counts == [4980] + plain.train_counts[1:]
    assert isinstance(splits.val.data, np.ndarray)


def test_cifar_holdout_is_the_same_for_every_run_seed(tmp_path, monkeypatch):
    """Every run seed trains and validates on the same images (the seed moves the training
    order and the weights, never the split).

    Guards against:
    - the validation hold-out drawn with the run seed (each seed would validate on other images);
    - the long-tailed training subset drawn with the run seed instead of LDAM's seed 0.
    """
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar(10))
    seed0 = build_splits("cifar10-lt", str(tmp_path), val_per_class=20, seed=0)
    seed1 = build_splits("cifar10-lt", str(tmp_path), val_per_class=20, seed=1)
    assert len(seed0.val) == 200 and seed0.val.targets == seed1.val.targets
    assert np.array_equal(seed0.val.data, seed1.val.data)
    assert seed0.train.targets == seed1.train.targets and np.array_equal(seed0.train.data, seed1.train.data)


def test_imagefolder_holdout_is_the_same_for_every_run_seed(tmp_path):
    """The image-folder hold-out, as for CIFAR: the same files whatever the run seed.

    Guards against:
    - the validation hold-out (or the long-tailed subset) of an image folder drawn with the run seed.
    """
    make_folder(str(tmp_path), [20] * 5, test_per_class=1)
    seed0 = build_splits("imagefolder", str(tmp_path), imbalance_ratio=10, val_per_class=2, seed=0)
    seed1 = build_splits("imagefolder", str(tmp_path), imbalance_ratio=10, val_per_class=2, seed=1)
    assert len(seed0.val) == 10 and seed0.val.paths == seed1.val.paths
    assert seed0.train.paths == seed1.train.paths


def test_cifar_files_missing_without_download(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path)) + ".*data.download: true"):
        build_splits("cifar10-lt", str(tmp_path))
    with pytest.raises(DataError, match="data.download: true"):
        build_splits("cifar100-lt", str(tmp_path / "nope"))


# ---------------------------------------------------------------- misc


def test_synthetic_and_transformed(tmp_path):
    opts = dict(num_classes=4, n_max=20, n_per_class_eval=4)
    splits = build_splits("synthetic", imbalance_ratio=10, synthetic_options=opts)
    assert splits.train_counts == longtail_counts(20, 4, 10)
    assert len(splits.val) == 8 and len(splits.test) == 16 and splits.image_size == 32
    wrapped = TransformedDataset(splits.train, lambda img: np.asarray(img).shape)
    assert wrapped[0] == ((32, 32, 3), 0) and len(wrapped) == len(splits.train)
    assert wrapped.targets == splits.train.targets and wrapped.classes == splits.classes
    with pytest.raises(DataError, match="n_classes"):
        build_splits("synthetic", synthetic_options={"n_classes": 3})


def test_unknown_name_lists_known_ones():
    with pytest.raises(DataError) as info:
        build_splits("cifar-11")
    assert all(name in str(info.value) for name in DATASET_NAMES)


# CI clones the repository into a folder beside a copy of the project's shared/ folder.
CIFAR10_JPEG = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def unpack(archive, into):
    """``tar xzf`` where there is one (1-2 s for the 60,000 files; Python's tarfile takes ~20 s)."""
    if shutil.which("tar"):
        subprocess.run(["tar", "xzf", str(archive), "-C", str(into)], check=True)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")


@pytest.mark.skipif(not CIFAR10_JPEG.is_file(),
                    reason="real-data test: no ../shared/data/cifar10-jpeg.tar.gz beside the repository "
                           "(CI has one; see shared/data/README.md)")
def test_cifar10_jpeg_folder_gives_the_published_cifar10_lt_split(tmp_path):
    """CIFAR-10 as JPEG files (the shared archive, real data): the split the published
    CIFAR-10-LT tables use, 12,386 training + 200 validation images and the 10,000 test images.

    Guards against:
    - a long-tailed subset other than LDAM-DRW's (seed 0, per-class shuffle of the sorted files);
    - validation images taken from the test split, left in the training split, unbalanced, or
      taken from the tail classes' kept images instead of those the subset left out;
    - class indices in another order than CIFAR-10's (airplane ... truck).
    """
    unpack(CIFAR10_JPEG, tmp_path)
    root = tmp_path / "cifar10-jpeg"
    try:
        check_published_split(root)
    finally:  # 236 MB of files: not left behind in pytest's kept temporary folders
        shutil.rmtree(root, ignore_errors=True)


def check_published_split(root):
    splits = build_splits("imagefolder", str(root), imbalance_ratio=100, val_per_class=20)
    assert splits.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                              "truck"]
    counts = longtail_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50] and sum(counts) == 12406
    assert splits.train_counts == [4980] + counts[1:]  # the head class gives up the 20 it keeps for validation
    assert len(splits.train) == 12386 and len(splits.val) == 200 and len(splits.test) == 10000
    assert np.bincount(splits.val.targets).tolist() == [20] * 10
    assert np.bincount(splits.test.targets).tolist() == [1000] * 10
    assert splits.image_size == 32 and splits.bad_files == []
    train, val = set(splits.train.paths), set(splits.val.paths)
    assert not train & val and all(os.path.relpath(p, root).startswith("train" + os.sep) for p in val)
    per_class = [sorted(str(p) for p in (root / "train" / c).iterdir()) for c in splits.classes]
    assert [len(files) for files in per_class] == [5000] * 10
    ldam = ldam_select(per_class, counts)
    assert train <= set(ldam) and len(set(ldam) - train) == 20  # the standard 12,406 less 20 head images
    head = set(per_class[0])
    assert all(p in head for p in set(ldam) - train)
    assert not (val - head) & set(ldam)  # the other classes' validation images are ones the subset left out


def test_view_batches_through_a_dataloader():
    from torch.utils.data import DataLoader

    from dscl.data import CIFAR_MEAN, CIFAR_STD, ClassBalancedSampler, ViewPatchTransform

    opts = dict(num_classes=3, n_max=6, n_per_class_eval=2)
    train = build_splits("synthetic", imbalance_ratio=3, synthetic_options=opts).train
    views = TransformedDataset(train, ViewPatchTransform(32, 16, mean=CIFAR_MEAN, std=CIFAR_STD))
    loader = DataLoader(views, batch_size=4, sampler=ClassBalancedSampler(train.targets))
    (query, key, patches, boxes), labels = next(iter(loader))
    assert query.shape == key.shape == (4, 3, 32, 32)
    assert patches.shape == (4, 5, 3, 16, 16) and boxes.shape == (4, 5, 4)
    assert labels.shape == (4,)


def test_folder_image_size_skips_unreadable_files_and_follows_the_native_size_rule(tmp_path):
    """An image folder's side, for a finished run that did not record it: the first readable
    training image's side when small and square, else 224; None without one.

    Guards against: an unreadable first file deciding the size; a large or non-square image
    taken at its own side; a missing folder raising instead of returning None."""
    from PIL import Image

    from dscl.data.datasets import folder_image_size

    assert folder_image_size(None) is None and folder_image_size(str(tmp_path / "absent")) is None
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"not an image")
    assert folder_image_size(str(tmp_path)) is None
    Image.new("RGB", (32, 32)).save(tmp_path / "train" / "a" / "1.png")
    assert folder_image_size(str(tmp_path)) == 32
    Image.new("RGB", (40, 30)).save(tmp_path / "train" / "a" / "0.png")
    assert folder_image_size(str(tmp_path)) == 224
