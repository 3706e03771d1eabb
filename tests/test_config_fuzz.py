"""Property-based tests of the config loader: whatever a recipe or an override holds, the
result is a Config or a ConfigError naming the file or the key, never another exception."""

import json
import string
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from dscl.config import METHODS, Config, config_from_dict, load_config
from dscl.errors import ConfigError

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECTIONS = ("data", "model", "pretrain", "linear", "logging")
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def nest(dotted: str, value) -> dict:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


DEFAULTS = flatten(Config().to_dict())
KEYS = sorted(DEFAULTS)
# Messages of validate() start with the key they are about; everything else names the source.
VALIDATED = set(KEYS) | {"pretrain.lr / linear.lr"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """One file path, rewritten by every example (hypothesis forbids function-scoped tmp_path)."""
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


def load_text(path: Path, text: str):
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def assert_config_or_error(call, source: str):
    """``call()`` returns a Config, or raises ConfigError whose message names ``source`` or a key."""
    try:
        cfg = call()
    except ConfigError as exc:
        message = str(exc)
        assert message.strip(), "empty ConfigError message"
        assert source in message or message.split(":", 1)[0] in VALIDATED, message
        event("ConfigError")
        return None
    assert isinstance(cfg, Config)
    event("Config")
    return cfg


# ---------------------------------------------------------------- strategies

scalars = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=12) | st.sampled_from(METHODS))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
# Values of roughly the right shape, so that more documents get past the type checks.
plausible = (st.integers(-3, 300) | st.floats(-1, 2) | st.sampled_from(METHODS)
             | st.lists(st.floats(0, 1), min_size=2, max_size=2) | st.none())


def section(name: str):
    fields = [k.split(".", 1)[1] for k in KEYS if k.startswith(name + ".")]
    return st.dictionaries(st.sampled_from(fields) | st.text(max_size=8), plausible | values, max_size=5)


config_docs = st.fixed_dictionaries({}, optional={
    **{k: plausible | values for k in KEYS if "." not in k},
    **{s: section(s) | values for s in SECTIONS},
    "unknown": values,
})

yaml_tokens = st.sampled_from([
    "method", "pretrain", "data", "epochs", "alpha", "queue_size", "patch_scale", ":", ": ", "- ",
    "? ", "&a ", "*a", "!!str ", "!!int ", "!!binary ", "!!python/name:os.system ", "[", "]", "{", "}",
    ",", "|", ">", "'", '"', "#", "~", "null", "true", "0.1", "-1", "1e3", "0x1F", ".nan", "2024-01-01",
    "<<: ", "%YAML 1.1", "---", "...", "\t", "  ", "\n", "\n  ", "\n    ",
])
yaml_like = st.lists(yaml_tokens, max_size=40).map("".join)


@st.composite
def edited_recipe(draw):
    """A shipped recipe with a few random single-character edits."""
    assume(CONFIGS)
    text = list(CONFIGS[draw(st.integers(0, len(CONFIGS) - 1))].read_text())
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(st.sampled_from(list(": -[]{},\n#'\"\t0a.") + [""]))
        if op == "insert" or i == len(text):
            text.insert(i, char)
        elif op == "delete":
            del text[i]
        else:
            text[i] = char
    return "".join(text)


documents = st.one_of(
    st.text(max_size=200),
    yaml_like,
    values.map(lambda v: yaml.safe_dump(v)),  # mostly non-mapping documents
    config_docs.map(lambda d: yaml.safe_dump(d, sort_keys=False)),
    config_docs.map(lambda d: yaml.safe_dump(d, default_flow_style=True)),
    edited_recipe(),
)


# ---------------------------------------------------------------- any file, any override


@FAST
@given(text=documents)
def test_any_yaml_file_gives_config_or_config_error(recipe, text):
    assert_config_or_error(lambda: load_text(recipe, text), str(recipe))


def test_shipped_recipes_load():
    assert CONFIGS
    for path in CONFIGS:
        assert isinstance(load_config(path), Config)


@st.composite
def override_strings(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.text(max_size=60))
    key = draw(st.sampled_from(KEYS + list(SECTIONS)) | st.text(max_size=12))
    if kind == 1:
        raw = draw(st.text(max_size=30))
    elif kind == 2:
        raw = draw(yaml_like)
    else:
        raw = json.dumps(draw(plausible | values))
    return f"{key}={raw}"


@FAST
@given(text=override_strings())
def test_any_override_gives_config_or_config_error(text):
    assert_config_or_error(lambda: load_config(None, [text]), "--set")


@FAST
@given(doc=config_docs, text=override_strings())
def test_file_then_override_gives_config_or_config_error(recipe, doc, text):
    recipe.write_text(yaml.safe_dump(doc), encoding="utf-8")
    try:
        cfg = load_config(recipe, [text])
    except ConfigError as exc:
        assert str(exc).strip()
    else:
        assert isinstance(cfg, Config)


# ---------------------------------------------------------------- round trips


def hint_of(key: str):
    *parents, leaf = key.split(".")
    obj = Config()
    for p in parents:
        obj = getattr(obj, p)
    return typing.get_type_hints(type(obj))[leaf]


def valid_value(key: str):
    """Values of the right type, mostly in range (validation may still refuse a combination)."""
    if key == "method":
        return st.sampled_from(METHODS)
    if key in ("pretrain.alpha", "pretrain.ema_momentum"):
        return st.floats(0, 0.99)
    return of_type(hint_of(key))


def of_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint):
        return st.none() | of_type(args[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # e.g. compile: bool | Literal["step"]
        return st.one_of(*map(of_type, args))
    if typing.get_origin(hint) is typing.Literal:
        return st.sampled_from(typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        if args[-1] is Ellipsis:
            return st.lists(of_type(args[0]), max_size=4)
        return st.tuples(*map(of_type, args)).map(sorted)  # sorted: patch_scale is (low, high)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(0, 10**12)
    if hint is float:
        return st.floats(1e-9, 1) | st.floats(1, 1e12) | st.just(float("inf"))
    if hint is str:
        return st.text(max_size=20)
    raise AssertionError(f"no strategy for {hint}")


@st.composite
def valid_configs(draw):
    chosen = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=10))
    base: dict = {}
    for key in chosen:
        value = draw(valid_value(key))
        node = base
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return load_config(base=base)
    except ConfigError:
        assume(False)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cfg=valid_configs())
def test_to_dict_round_trips(recipe, cfg):
    values = cfg.to_dict()
    assert load_config(base=values).to_dict() == values
    assert config_from_dict(values).to_dict() == values
    recipe.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")  # as a run's config.yaml
    assert load_config(recipe).to_dict() == values


def render_json(value) -> str:
    return json.dumps(value)


def render_yaml_flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


@pytest.mark.parametrize("render", [render_json, render_yaml_flow])
@pytest.mark.parametrize("key", KEYS)
def test_every_key_can_be_set_to_its_default(key, render):
    cfg = load_config(None, [f"{key}={render(DEFAULTS[key])}"])
    assert cfg.to_dict() == load_config(None).to_dict()  # the defaults, with the data set's ratio filled in


@FAST
@given(x=st.floats(1e-300, 1e300).filter(lambda x: "." in repr(x)))
def test_float_with_a_decimal_point_survives_set(x):
    assert load_config(None, [f"pretrain.lr={x!r}"]).pretrain.lr == x


# ---------------------------------------------------------------- misspelled keys


@st.composite
def misspelled(draw):
    """(correct key, misspelled key): one character inserted, deleted, replaced or swapped."""
    key = draw(st.sampled_from(KEYS))
    i = draw(st.integers(0, len(key) - 1))
    char = draw(st.sampled_from(string.ascii_letters + string.digits + "_."))
    op = draw(st.sampled_from(["insert", "delete", "replace", "swap", "case"]))
    if op == "insert":
        wrong = key[:i] + char + key[i:]
    elif op == "delete":
        wrong = key[:i] + key[i + 1:]
    elif op == "replace":
        wrong = key[:i] + char + key[i + 1:]
    elif op == "swap":
        wrong = key[:i] + key[i + 1:i + 2] + key[i] + key[i + 2:]
    else:
        wrong = key[:i] + key[i].swapcase() + key[i + 1:]
    assume(wrong not in KEYS and wrong not in SECTIONS and wrong.strip() == wrong)
    return key, wrong


def reported_key(wrong: str) -> str:
    """The dotted key the message must name: up to the first part that is no key, or the leaf."""
    parts = wrong.split(".")
    for n in range(1, len(parts) + 1):
        prefix = ".".join(parts[:n])
        if prefix in KEYS:
            return prefix  # a leaf with more parts after it: its value is not a mapping
        if prefix not in SECTIONS:
            return prefix
    raise AssertionError(f"{wrong} names a section only")


def check_misspelling(message: str, key: str, wrong: str) -> None:
    named = reported_key(wrong)
    assert named in message, message
    known = {k.rsplit(".", 1)[0] + "." if "." in k else "" for k in KEYS}
    parent = named.rsplit(".", 1)[0] + "." if "." in named else ""
    if named not in KEYS and parent in known and key.startswith(parent):
        real = key[len(parent):].split(".")[0]
        if real[:3] == named[len(parent):][:3]:
            assert "did you mean" in message and parent + real in message, message


@FAST
@given(pair=misspelled())
def test_misspelled_override_names_the_dotted_key(pair):
    key, wrong = pair
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{wrong}={render_json(DEFAULTS[key])}"])
    check_misspelling(str(info.value), key, wrong)


@FAST
@given(pair=misspelled())
def test_misspelled_recipe_key_names_file_and_dotted_key(recipe, pair):
    key, wrong = pair
    assume("" not in wrong.split("."))  # an empty YAML key is a different document
    with pytest.raises(ConfigError) as info:
        load_text(recipe, yaml.safe_dump(nest(wrong, DEFAULTS[key])))
    assert str(recipe) in str(info.value)
    check_misspelling(str(info.value), key, wrong)


# ---------------------------------------------------------------- odd input found by fuzzing


def test_config_file_that_is_not_utf8(recipe):
    recipe.write_bytes(b"pretrain:\n  epochs: \xff\xfe\n")
    with pytest.raises(ConfigError, match="recipe.yaml"):
        load_config(recipe)


@pytest.mark.parametrize("text", ["seed: !!int", "seed: !!int ;", "pretrain:\n  lr: !!float x",
                                  "data:\n  download: !!bool x", "data:\n  root: !!timestamp x",
                                  "data:\n  root: 2001-02-30"])
def test_yaml_constructor_errors_in_file(recipe, text):
    with pytest.raises(ConfigError, match="recipe.yaml"):
        load_text(recipe, text)


@pytest.mark.parametrize("text", ["seed=!!int", "pretrain.lr=!!float x"])
def test_yaml_constructor_errors_in_override(text):
    with pytest.raises(ConfigError, match=text.split("=")[0]):
        load_config(None, [text])


def test_deeply_nested_yaml_file(recipe):
    recipe.write_text("a: " + "[" * 1500)
    with pytest.raises(ConfigError, match="recipe.yaml"):
        load_config(recipe)


def test_deeply_nested_override():
    with pytest.raises(ConfigError, match="pretrain.lr"):
        load_config(None, ["pretrain.lr=" + "[" * 1500])


@pytest.mark.parametrize("where", ["file", "override"])
def test_huge_integer_literal(recipe, where):
    digits = "9" * 5000
    if where == "file":  # the YAML parser itself refuses it: the message names the file
        with pytest.raises(ConfigError, match="recipe.yaml"):
            load_text(recipe, f"pretrain:\n  epochs: {digits}\n")
    else:
        with pytest.raises(ConfigError, match="pretrain.epochs"):
            load_config(None, [f"pretrain.epochs={digits}"])


@pytest.mark.parametrize("text, value", [("5e-4", 5e-4), ("1e-05", 1e-05), ("1e9", 1e9)])
def test_float_in_exponent_notation(text, value):
    assert load_config(None, [f"pretrain.weight_decay={text}"]).pretrain.weight_decay == value



@pytest.mark.parametrize("text, root", [("data.root=2018", "2018"), ("data.root=1.5", "1.5"),
                                        ("data.root=yes", "yes"), ("data.root=2001-02-30", "2001-02-30")])
def test_string_key_takes_a_number_like_value(text, root):
    assert load_config(None, [text]).data.root == root
