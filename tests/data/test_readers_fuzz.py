"""Property-based tests of the split-file readers: whatever a split file holds (random lines and
tokens, random JSON, empty files, binary junk), reading it returns or raises DataError naming the
file, and the line or entry at fault, never another exception.

Each text / JSON property also checks the reader against a small oracle written here from the
documented format: the first malformed line (entry) is the one reported; a file with none reads
to exactly the labels it lists.
"""

import json
import os
import re
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from dscl.data import build_splits
from dscl.data.readers import read_coco_json, read_split_json, read_split_text
from dscl.errors import DataError

FAST = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
IMAGES = ("img/a.png", "img/b.png", "img/c.jpg", "img/bad.png")  # bad.png exists but is not an image
CLASSES = 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data root holding a few real tiny images, one corrupt file and a folder named like an image."""
    root = tmp_path_factory.mktemp("readers")
    rng = np.random.default_rng(0)
    for name in IMAGES[:3]:
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(root / name)
    (root / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (root / "img" / "dir.png").mkdir()
    return root


def clear(root, *names):
    for name in names:
        if os.path.exists(root / name):
            os.remove(root / name)


# ---------------------------------------------------------------- strategies

path_tokens = st.sampled_from(IMAGES + ("./img/a.png", "img//b.png", "img/dir.png", "img/missing.png",
                                        "/no/such/abs.png", "img/a.png\x00", "img", "IMG/A.PNG"))
label_tokens = (st.integers(-3, 1003).map(str)
                | st.sampled_from(["+1", "1_0", "0x1", "1.0", "1e3", "\u0663", "nan", "-0", "9" * 40, "00"]))
tokens = path_tokens | label_tokens | st.text(min_size=1, max_size=8)
separators = st.sampled_from([" ", "\t", "  ", " \t ", "\u00a0", "\x0b"])


@st.composite
def split_lines(draw, num_classes: int):
    """Lines mostly of the right shape, mixed with every kind of malformed one."""
    good = st.tuples(st.sampled_from(IMAGES[:3]), st.integers(0, num_classes - 1)).map(
        lambda t: f"{t[0]} {t[1]}")
    shaped = st.lists(tokens, max_size=4).flatmap(
        lambda ts: separators.map(lambda sep: sep.join(ts)))
    lines = draw(st.lists(good | shaped | st.just("") | st.text(max_size=20), max_size=12))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return newline.join(lines) + draw(st.sampled_from(["", newline]))


def cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def text_files(num_classes: int):
    return st.one_of(
        split_lines(num_classes).map(lambda t: t.encode()),
        split_lines(num_classes).map(lambda t: b"\xef\xbb\xbf" + t.encode()),  # with a BOM
        st.text(max_size=80).map(lambda t: t.encode()),
        st.binary(max_size=80),
        st.tuples(split_lines(num_classes), st.binary(min_size=1, max_size=4)).map(  # junk mid-file
            lambda t: cut(t[0].encode(), 0.5) + t[1] + t[0].encode()[len(cut(t[0].encode(), 0.5)):]),
        st.just(b""),
    )


json_scalars = (st.none() | st.booleans() | st.integers(-3, 5) | st.integers() | st.floats()
                | st.text(max_size=6) | path_tokens)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
ids = st.integers(0, 4) | json_scalars | json_values


def entries(num_classes: int):
    good = st.fixed_dictionaries({"path": st.sampled_from(IMAGES[:3]),
                                  "label": st.integers(0, num_classes - 1)})
    fuzzy = st.fixed_dictionaries({}, optional={
        "path": path_tokens | json_values, "label": label_tokens | json_values, "extra": json_values})
    return st.lists(good | fuzzy | json_values, max_size=8)


@st.composite
def mutated(draw, document):
    """``document`` with one to three random edits deep inside: a value replaced, a key or an
    item deleted, an item duplicated. Near-valid files reach the checks that junk never does."""
    doc = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        node = doc
        while isinstance(node, (dict, list)) and len(node):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            child = node[key]
            if isinstance(child, (dict, list)) and len(child) and draw(st.booleans()):
                node = child
                continue
            op = draw(st.sampled_from(["replace", "delete", "duplicate"]))
            if op == "replace":
                node[key] = draw(ids)
            elif op == "delete":
                del node[key]
            elif isinstance(node, list):
                node.append(child)
            break
    return doc


def json_files(documents):
    """Serialised documents, also truncated, with a BOM, or replaced by junk."""
    return st.one_of(
        documents.map(lambda d: json.dumps(d).encode()),
        documents.map(lambda d: json.dumps(d, indent=1).encode()),
        st.tuples(documents, st.floats(0, 1)).map(lambda t: cut(json.dumps(t[0], indent=1).encode(), t[1])),
        documents.map(lambda d: b"\xef\xbb\xbf" + json.dumps(d).encode()),
        st.text(max_size=60).map(lambda t: t.encode()),
        st.binary(max_size=60),
        st.just(b""),
    )


# ---------------------------------------------------------------- oracles


def universal_lines(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def label_problem(value, num_classes: int) -> str | None:
    """What the reader must say about a label, as ``label {value!r} is not an integer`` /
    ``label {value} out of range``; None for a good label."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return f"label {value!r} is not an integer"
    try:
        label = int(value)
    except ValueError:
        return f"label {value!r} is not an integer"
    return None if 0 <= label < num_classes else f"label {label} out of range"


def text_oracle(data: bytes, path: str, root: str, num_classes: int):
    """("ok", labels) or ("error", text the message must hold)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[:exc.start].decode("utf-8")
        return "error", f"{path}, line {len(universal_lines(before))}: not UTF-8"
    labels, files = [], []
    for n, line in enumerate(universal_lines(text), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            return "error", f"{path}, line {n}: expected 'relative/path label', got {len(fields)} field"
        problem = label_problem(fields[1], num_classes)
        if problem:
            return "error", f"{path}, line {n}: {problem}"
        labels.append(int(fields[1]))
        files.append((n, os.path.join(root, fields[0])))
    for n, file in files:
        if not os.path.isfile(file):
            return "error", f"{path}, line {n}: image file not found"
    return "ok", labels


def json_oracle(data: bytes, path: str, root: str, num_classes: int):
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        return "error", f"{path}"
    if not isinstance(doc, list):
        return "error", f"{path}: expected a JSON list"
    labels, files = [], []
    for i, entry in enumerate(doc):
        where = f"{path}, entry [{i}]"
        if not isinstance(entry, dict) or "path" not in entry or "label" not in entry:
            return "error", f"{where}: expected an object"
        if not isinstance(entry["path"], str):
            return "error", f"{where}.path: expected a string"
        problem = label_problem(entry["label"], num_classes)
        if problem:
            return "error", f"{where}.label: {problem}"
        labels.append(int(entry["label"]))
        files.append((i, os.path.join(root, entry["path"])))
    for i, file in files:
        if not os.path.isfile(file):
            return "error", f"{path}, entry [{i}].path: image file not found"
    return "ok", labels


def check_against(oracle, read, data: bytes, path: str, root: str, num_classes: int):
    expected, detail = oracle(data, path, root, num_classes)
    try:
        _, labels = read(path, root, num_classes)
    except DataError as exc:
        event("DataError")
        assert expected == "error", f"unexpected DataError: {exc}"
        assert detail in str(exc), f"expected {detail!r} in {str(exc)!r}"
    else:
        event("read")
        assert expected == "ok", f"read a file that should fail with {detail!r}"
        assert labels == detail


# ---------------------------------------------------------------- the readers on their own


@FAST
@given(data=text_files(CLASSES))
def test_read_split_text_any_content(root, data):
    path = str(root / "split.txt")
    (root / "split.txt").write_bytes(data)
    check_against(text_oracle, read_split_text, data, path, str(root), CLASSES)


VALID_ENTRIES = [{"path": IMAGES[c % 3], "label": c % CLASSES} for c in range(5)]


@FAST
@given(data=json_files(entries(CLASSES) | json_values | mutated(VALID_ENTRIES)))
def test_read_split_json_any_content(root, data):
    path = str(root / "split.json")
    (root / "split.json").write_bytes(data)
    check_against(json_oracle, read_split_json, data, path, str(root), CLASSES)


# ---------------------------------------------------------------- through build_splits


def write_valid_lt(root, prefix: str, num_classes: int) -> None:
    lines = [f"{IMAGES[c % 3]} {c}" for c in range(num_classes)]
    (root / f"{prefix}_train.txt").write_text("\n".join(lines) + "\n")
    (root / f"{prefix}_test.txt").write_text("img/a.png 0\nimg/c.jpg 1\n")


def assert_data_error_names(call, path: str, text_file: bool):
    try:
        splits = call()
    except DataError as exc:
        message = str(exc)
        event("DataError")
        assert path in message, message
        if text_file and re.search(r"field|label|not found|UTF-8", message):
            assert re.search(re.escape(path) + r", line \d+: ", message), message
        return None
    event("splits")
    return splits


@FAST
@given(data=text_files(1000), fuzzed=st.sampled_from(["train", "val", "test"]),
       skip=st.booleans())
def test_imagenet_lt_text_split_any_content(root, data, fuzzed, skip):
    clear(root, *(f"ImageNet_LT_{s}.{e}" for s in ("train", "val", "test") for e in ("txt", "json")))
    write_valid_lt(root, "ImageNet_LT", 1000)
    path = root / f"ImageNet_LT_{fuzzed}.txt"
    path.write_bytes(data)
    splits = assert_data_error_names(
        lambda: build_splits("imagenet-lt", str(root), skip_bad_images=skip), str(path), True)
    if splits is not None:  # only a fuzzed val / test file can leave the 1000 classes complete
        assert fuzzed != "train" and splits.num_classes == 1000


@FAST
@given(data=json_files(entries(365) | json_values), fuzzed=st.sampled_from(["train", "test"]))
def test_places_lt_json_split_any_content(root, data, fuzzed):
    clear(root, *(f"Places_LT_{s}.{e}" for s in ("train", "val", "test") for e in ("txt", "json")))
    write_valid_lt(root, "Places_LT", 365)
    os.remove(root / f"Places_LT_{fuzzed}.txt")  # where no .txt exists, the .json is read
    path = root / f"Places_LT_{fuzzed}.json"
    path.write_bytes(data)
    assert_data_error_names(lambda: build_splits("places-lt", str(root)), str(path), False)



def coco_docs():
    image = st.fixed_dictionaries({"id": st.integers(0, 4), "file_name": st.sampled_from(IMAGES)},
                                  optional={"width": json_scalars}) \
        | st.fixed_dictionaries({}, optional={"id": ids, "file_name": path_tokens | json_values})
    annotation = st.fixed_dictionaries({"image_id": st.integers(0, 4), "category_id": st.integers(0, 3)}) \
        | st.fixed_dictionaries({}, optional={"image_id": ids, "category_id": ids, "id": ids})
    category = st.fixed_dictionaries({"id": st.integers(0, 3)}, optional={"name": json_scalars}) \
        | st.fixed_dictionaries({}, optional={"id": ids, "name": json_values})
    lists = {"images": st.lists(image | json_values, max_size=5),
             "annotations": st.lists(annotation | json_values, max_size=6),
             "categories": st.lists(category | json_values, max_size=4)}
    return st.fixed_dictionaries({}, optional={k: v | json_values for k, v in lists.items()}) | json_values


VALID_COCO = {"images": [{"id": 1, "file_name": "img/a.png"}, {"id": 2, "file_name": "img/b.png"},
                         {"id": 3, "file_name": "img/c.jpg"}],
              "annotations": [{"image_id": 1, "category_id": 0}, {"image_id": 2, "category_id": 1},
                              {"image_id": 3, "category_id": 1}],
              "categories": [{"id": 0, "name": "x"}, {"id": 1, "name": "y"}]}


@FAST
@given(data=json_files(coco_docs() | mutated(VALID_COCO)), fuzzed=st.sampled_from(["train2018", "val2018"]),
       skip=st.booleans())
def test_inat_coco_json_any_content(root, data, fuzzed, skip):
    for name in ("train2018", "val2018"):
        (root / f"{name}.json").write_text(json.dumps(VALID_COCO))
    path = root / f"{fuzzed}.json"
    path.write_bytes(data)
    try:
        splits = build_splits("inat2018", str(root), skip_bad_images=skip)
    except DataError as exc:
        message = str(exc)
        event("DataError")
        # A fuzzed train file may list categories the valid val file does not use: val is named.
        other = str(root / "val2018.json")
        assert str(path) in message or (other in message and "training categories" in message), message
    else:
        event("splits")
        assert len(splits.train) and len(splits.test)


@FAST
@given(data=json_files(coco_docs() | mutated(VALID_COCO)))
def test_read_coco_json_any_content(root, data):
    (root / "any.json").write_bytes(data)
    try:
        (paths, labels), cat_ids, names = read_coco_json(str(root / "any.json"), str(root))
    except DataError as exc:
        event("DataError")
        assert str(root / "any.json") in str(exc)
    else:
        event("read")
        assert len(paths) == len(labels) and len(cat_ids) == len(names)
        assert all(0 <= y < len(cat_ids) for y in labels) and all(os.path.isfile(p) for p in paths)


# ---------------------------------------------------------------- inputs that once escaped


@pytest.mark.parametrize("content, pattern", [
    (b"img/a.png 0\nimg/b.png 1\n\xff\xfe\n", r"split.txt, line 3: not UTF-8"),
    (b"img/a.png 0\rimg/b.png 1\r\xff\r", r"split.txt, line 3: not UTF-8"),
    (b"\xef\xbb\xbfimg/a.png 0\nimg/a.png x\n", r"split.txt, line 2: label 'x'"),
])
def test_text_split_regressions(root, content, pattern):
    (root / "split.txt").write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        read_split_text(str(root / "split.txt"), str(root), CLASSES)


@pytest.mark.parametrize("content, pattern", [
    (b"\xff\xfe[]", r"split.json, line 1: not UTF-8"),
    (b"[" * 100_000, r"split.json: invalid JSON: .*nested too deeply"),
    (b"[{\"path\": \"img/a.png\", \"label\": " + b"1" * 5000 + b"}]", r"split.json: invalid JSON"),
])
def test_json_split_regressions(root, content, pattern):
    (root / "split.json").write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        read_split_json(str(root / "split.json"), str(root), CLASSES)


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d["images"][0].update(id=[1]), r"images\[0\] needs an 'id'"),
    (lambda d: d["images"][0].update(id={"a": 1}), r"images\[0\] needs an 'id'"),
    (lambda d: d["annotations"][1].update(image_id=[2]), r"annotations\[1\].image_id = \[2\]"),
    (lambda d: d["annotations"][0].update(category_id={}), r"annotations\[0\].category_id = \{\}"),
    (lambda d: d["categories"].append({"id": 1}), r"categories\[2\].id = 1 repeats categories\[1\]"),
])
def test_coco_regressions(root, edit, pattern):
    doc = json.loads(json.dumps(VALID_COCO))
    edit(doc)
    (root / "any.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"any.json: " + pattern):
        read_coco_json(str(root / "any.json"), str(root))


def test_empty_test_split_names_its_own_file(root):
    """After dropping unreadable images, an empty split is blamed on the file it came from."""
    for name, doc in (("train2018", VALID_COCO),
                      ("val2018", {"images": [{"id": 1, "file_name": "img/bad.png"}],
                                   "annotations": [{"image_id": 1, "category_id": 1}],
                                   "categories": VALID_COCO["categories"]})):
        (root / f"{name}.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"val2018.json: the test split is empty after dropping 1"):
        build_splits("inat2018", str(root), skip_bad_images=True)


def test_empty_test_folder_names_the_test_folder(tmp_path):
    for c in ("x", "y"):
        os.makedirs(tmp_path / "train" / c)
        os.makedirs(tmp_path / "test" / c)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / c / "a.png")
        (tmp_path / "test" / c / "bad.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "test")) + ": the test split is empty"):
        build_splits("imagefolder", str(tmp_path), skip_bad_images=True)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels: PIL refuses it as a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_unreadable_first_image_does_not_decide_the_size(tmp_path):
    """The native size comes from the first training file; a corrupt or bomb-sized one is skipped."""
    for c in ("x", "y"):
        for split in ("train", "test"):
            os.makedirs(tmp_path / split / c)
            Image.new("RGB", (32, 32)).save(tmp_path / split / c / "a.png")
    (tmp_path / "train" / "x" / "-first.png").write_bytes(png_header(100_000, 100_000))  # 10^10 px
    assert build_splits("imagefolder", str(tmp_path)).image_size == 224  # raises later, on use
    skipped = build_splits("imagefolder", str(tmp_path), skip_bad_images=True)
    assert skipped.bad_files == [str(tmp_path / "train" / "x" / "-first.png")]
    assert skipped.image_size == 32
