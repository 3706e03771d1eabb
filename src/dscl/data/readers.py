"""Readers of the on-disk layouts: image folders, split text / JSON lists, COCO-style JSON.

Each reader returns plain lists (paths, labels, class names) and checks everything that can be
checked before training starts, so a typo on line 80,000 of a split file fails at once with the
file and line, not hours later inside a data-loader worker.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

from dscl.data.images import is_image_file
from dscl.errors import DataError

# (paths, labels): one entry per image.
Listing = tuple[list[str], list[int]]


def _list_dir(folder: str, *, dirs: bool) -> list[str]:
    """Sorted names of the sub-folders (dirs=True) or image files in ``folder``, no hidden."""
    with os.scandir(folder) as it:
        names = [e.name for e in it if not e.name.startswith(".")
                 and (e.is_dir() if dirs else e.is_file() and is_image_file(e.name))]
    return sorted(names)


def read_image_folder(root: str, test_folder: str = "test") -> tuple[dict[str, Listing], list[str]]:
    """Read ``root/<split>/<class>/<image>`` for splits train, val (optional) and test.

    The test split is read from ``root/<test_folder>`` (``test`` unless told otherwise, e.g.
    ``val`` for data sets such as Imagenette whose labelled evaluation folder is named so); a
    ``val`` folder that is not the test folder is the validation split. Class indices follow the
    sorted class-folder names of ``train``; files within a class are taken in sorted name order.
    Returns ``({split: (paths, labels)}, classes)`` with keys train, test and, where read, val.
    """
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise DataError(f"image folder {root}: no 'train' folder (expected root/train/<class>/)")
    if test_folder in ("", ".", "..", "train") or "/" in test_folder or os.sep in test_folder:
        raise DataError(f"image folder {root}: the test folder must be one folder beside train, "
                        f"got {test_folder!r} (data.test_folder)")
    classes = _list_dir(train_dir, dirs=True)
    if not classes:
        raise DataError(f"image folder {train_dir}: no class folders")
    index = {name: c for c, name in enumerate(classes)}
    folders = {"train": "train", "val": None if test_folder == "val" else "val", "test": test_folder}
    splits: dict[str, Listing] = {}
    for split, folder_name in folders.items():
        if folder_name is None:
            continue
        split_dir = os.path.join(root, folder_name)
        if not os.path.isdir(split_dir):
            if split == "test":
                where = "" if test_folder == "test" else " (data.test_folder)"
                raise DataError(f"image folder {root}: no {test_folder!r} folder for the test split{where}")
            continue
        paths: list[str] = []
        labels: list[int] = []
        for name in _list_dir(split_dir, dirs=True):
            folder = os.path.join(split_dir, name)
            if name not in index:
                raise DataError(f"class folder {folder} has no counterpart in {train_dir}")
            files = _list_dir(folder, dirs=False)
            if split == "train" and not files:
                raise DataError(f"class folder {folder} holds no training image "
                                f"(extensions: .jpg .jpeg .png .bmp .webp .ppm)")
            paths.extend(os.path.join(folder, f) for f in files)
            labels.extend([index[name]] * len(files))
        if not paths:
            raise DataError(f"image folder {split_dir}: no image in any class folder")
        splits[split] = (paths, labels)
    return splits, classes


def _check_files(found: list[tuple[str, str]], what: str) -> None:
    """Raise one DataError listing the (where, path) pairs whose file does not exist."""
    missing = [(where, p) for where, p in found if not os.path.isfile(p)]
    if missing:
        shown = "; ".join(f"{where}: image file not found: {p}" for where, p in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataError(f"{len(missing)} missing image(s) in {what}: {shown}{more}")


def _label(value: object, where: str, num_classes: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: label {value!r} is not an integer")
    try:
        label = int(value)
    except ValueError:
        raise DataError(f"{where}: label {value!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} out of range [0, {num_classes})")
    return label


def _read_text(path: str) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped); DataError names the line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = data[:exc.start].decode("utf-8-sig")  # counted as read_split_text counts lines
        lineno = len(io.StringIO(before + "|", newline=None).readlines())
        raise DataError(f"{path}, line {lineno}: not UTF-8 text (byte {data[exc.start]:#04x}); "
                        f"is this a split file?") from None


def read_split_text(path: str, root: str, num_classes: int) -> Listing:
    """Read a ``relative/path label`` split file (ImageNet-LT, Places-LT); paths under root.

    Blank lines are skipped; every other line must hold exactly two whitespace-separated fields.
    """
    paths, labels, found = [], [], []
    with io.StringIO(_read_text(path), newline=None) as f:  # universal newlines, as open() has
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}, line {lineno}"
            if len(fields) != 2:
                raise DataError(f"{where}: expected 'relative/path label', "
                                f"got {len(fields)} field(s): {line.strip()!r}")
            labels.append(_label(fields[1], where, num_classes))
            paths.append(os.path.join(root, fields[0]))
            found.append((where, paths[-1]))
    _check_files(found, path)
    return paths, labels


def _load_json(path: str) -> object:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: invalid JSON: {exc.msg}") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise DataError(f"{path}: invalid JSON: {exc}") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON: arrays or objects nested too deeply") from None


def read_split_json(path: str, root: str, num_classes: int) -> Listing:
    """Read the JSON form of a split file: a list of ``{"path": relative, "label": int}``."""
    entries = _load_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of {{'path', 'label'}} objects")
    paths, labels, found = [], [], []
    for i, entry in enumerate(entries):
        where = f"{path}, entry [{i}]"
        if not isinstance(entry, dict) or "path" not in entry or "label" not in entry:
            raise DataError(f"{where}: expected an object with keys 'path' and 'label'")
        if not isinstance(entry["path"], str):
            raise DataError(f"{where}.path: expected a string, got {entry['path']!r}")
        labels.append(_label(entry["label"], f"{where}.label", num_classes))
        paths.append(os.path.join(root, entry["path"]))
        found.append((f"{where}.path", paths[-1]))
    _check_files(found, path)
    return paths, labels


def _is_key(value: object) -> bool:
    """JSON values that can be ids: anything but arrays and objects (which are unhashable)."""
    return not isinstance(value, (list, dict))


def _list_of_dicts(doc: dict, key: str, path: str) -> list[dict]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise DataError(f"{path}: key '{key}' missing or not a list")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}: {key}[{i}] is not an object")
    return value


def _coco_categories(doc: dict, path: str) -> tuple[list[int], list[str]]:
    """Category ids (sorted; their position is the class index) and names."""
    cats = _list_of_dicts(doc, "categories", path)
    for i, cat in enumerate(cats):
        if not isinstance(cat.get("id"), int):
            raise DataError(f"{path}: categories[{i}].id missing or not an integer")
    if not cats:
        raise DataError(f"{path}: 'categories' is empty")
    seen: dict[int, int] = {}
    for i, cat in enumerate(cats):
        first = seen.setdefault(cat["id"], i)
        if first != i:
            raise DataError(f"{path}: categories[{i}].id = {cat['id']} repeats categories[{first}].id")
    cats = sorted(cats, key=lambda c: c["id"])
    return [c["id"] for c in cats], [str(c.get("name", c["id"])) for c in cats]


def read_coco_json(
    path: str, root: str, category_ids: Sequence[int] | None = None
) -> tuple[Listing, list[int], list[str]]:
    """Read a COCO-style JSON (iNaturalist 2018): ``images``, ``annotations``, ``categories``.

    Labels are positions of ``category_id`` among ``category_ids`` (pass the training file's
    to read a test file), by default among this file's own sorted category ids. Items follow
    the order of ``annotations``; images without an annotation are ignored. Returns
    ``((paths, labels), category ids, class names)``.
    """
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations, categories")
    names: list[str] = []
    if category_ids is None:
        category_ids, names = _coco_categories(doc, path)
    images = _list_of_dicts(doc, "images", path)
    annotations = _list_of_dicts(doc, "annotations", path)
    files: dict[object, tuple[int, str]] = {}
    for j, img in enumerate(images):
        if "id" not in img or not _is_key(img["id"]) or not isinstance(img.get("file_name"), str):
            raise DataError(f"{path}: images[{j}] needs an 'id' (a number or string) "
                            f"and a string 'file_name'")
        files[img["id"]] = (j, img["file_name"])
    label_of = {cid: c for c, cid in enumerate(category_ids)}
    paths, labels, found = [], [], []
    for i, ann in enumerate(annotations):
        if not _is_key(ann.get("image_id")) or ann.get("image_id") not in files:
            raise DataError(f"{path}: annotations[{i}].image_id = {ann.get('image_id')!r} "
                            f"has no entry in 'images'")
        cid = ann.get("category_id")
        if isinstance(cid, bool) or not _is_key(cid) or cid not in label_of:
            raise DataError(f"{path}: annotations[{i}].category_id = {cid!r} is not one of "
                            f"the {len(label_of)} training categories")
        j, name = files[ann["image_id"]]
        labels.append(label_of[cid])
        paths.append(os.path.join(root, name))
        found.append((f"{path}: images[{j}].file_name", paths[-1]))
    _check_files(found, path)
    return (paths, labels), list(category_ids), names
