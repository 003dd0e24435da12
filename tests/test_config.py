"""Config: layering, strictness, one-line errors with exit status 2, documented fields, every recipe loads."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from tests.conftest import run_cli
from trainer import config
from trainer.config import ConfigError


def write(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def test_precedence_defaults_recipe_override(tmp_path):
    path = write(tmp_path, "optim: {lr: 0.3, momentum: 0.5}\ngnp: {alpha: 0.5}\n")
    cfg = config.load(path, ["optim.lr=0.7", "loop.epochs=3"])
    assert cfg.optim.lr == 0.7  # override beats recipe
    assert cfg.optim.momentum == 0.5  # recipe beats default
    assert cfg.gnp.alpha == 0.5
    assert cfg.gnp.r == config.GNPConfig().r  # untouched default
    assert cfg.loop.epochs == 3
    assert cfg.recipe == "r"


def test_override_types_parse_as_yaml(tmp_path):
    cfg = config.load(
        write(tmp_path, ""),
        [
            "gnp.norm_perturbations=true",
            "optim.betas=[0.8, 0.9]",
            "schedule.milestones=[1, 2.5]",
            "model.kwargs={dropout: 0.1}",
            "optim.lr=1",
            "run.dir=/tmp/x",
        ],
    )
    assert cfg.gnp.norm_perturbations is True
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.schedule.milestones == (1.0, 2.5)
    assert cfg.model.kwargs == {"dropout": 0.1}
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int accepted for a float field
    assert cfg.run.dir == "/tmp/x"


def test_config_is_frozen(tmp_path):
    cfg = config.load(write(tmp_path, ""))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "optim.lrr: unknown key; did you mean 'lr'?"),
        ("optimm.lr=0.1", "optimm: unknown key; did you mean 'optim'?"),
        ("optim.lr=fast", "optim.lr: invalid value 'fast'; expected a number"),
        ("loop.epochs=2.5", "loop.epochs: invalid value 2.5; expected an integer"),
        ("loop.epochs=true", "loop.epochs: invalid value True; expected an integer"),
        ("gnp.norm_perturbations=1", "gnp.norm_perturbations: invalid value 1; expected true or false"),
        ("optim.name=sgdd", "optim.name: invalid value 'sgdd'; expected one of 'sgd', 'adamw' (did you mean 'sgd'?)"),
        ("gnp.warmup=lamda", "did you mean 'lambda'?"),
        ("gnp.r=-0.1", "gnp.r: invalid value -0.1; expected a number >= 0"),
        ("gnp.alpha=-1", "gnp.alpha: invalid value -1.0"),
        ("gnp.hybrid_p=0", "gnp.hybrid_p: invalid value 0.0; expected a probability in (0, 1]"),
        ("checkpoint.keep=1", "checkpoint.keep: invalid value 1; expected an integer >= 2"),
        ("optim.betas=[0.9]", "optim.betas: invalid value [0.9]; expected a list of 2 values"),
        ("gnp.warmup=zero", "gnp.warmup_epochs: invalid value 0.0; expected > 0 when gnp.warmup is 'zero'"),
        ("schedule.milestones=[3, 1]", "schedule.milestones: invalid value [3.0, 1.0]; expected increasing"),
        ("data.label_smoothing=1.0", "data.label_smoothing: invalid value 1.0; expected a number in [0, 1)"),
        (
            "data.image_size=4",
            "data.image_size: invalid value 4; expected 0 (the stored size) or an integer in 8..4096",
        ),
        (
            "data.image_size=4097",
            "data.image_size: invalid value 4097; expected 0 (the stored size) or an integer in 8..",
        ),
        ("loop", "--set: 'loop' is not of the form section.key=value"),
        ("optim=3", "optim: expected a mapping of"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, ""), [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_alpha_above_one_is_legal(tmp_path):
    assert config.load(write(tmp_path, ""), ["gnp.alpha=2.5"]).gnp.alpha == 2.5


def test_unknown_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'fashion-mnist-dem'; did you mean 'fashion-mnist-demo'"):
        config.load("fashion-mnist-dem")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        config.load(write(tmp_path, "optim: {lr: [\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.load(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(str(tmp_path / "nope.yaml"))


def test_every_field_is_documented():
    for cls in config.sections():
        docs = config.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize("name", sorted(config.list_recipes()))
def test_every_recipe_loads_and_round_trips(name):
    cfg = config.load(name)
    assert config.list_recipes()[name], f"recipe {name} has no description"
    again = config.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict(cfg))))
    assert again == cfg


def test_describe_lists_every_leaf():
    keys = [k for k, _, _ in config.describe()]
    assert "gnp.alpha" in keys and "optim.clip_norm" in keys and "loop.seed" in keys
    assert len(keys) == len(set(keys))


# The CLI contract: one line on stderr, exit status 2, no traceback.
@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
        (["train", "--recipe", "debug-cpu", "--set", "optim.lr=abc"], "optim.lr: invalid value 'abc'"),
        (["train", "--recipe", "debug-cpu", "--set", "data.path=/nonexistent/ds"], "/nonexistent/ds"),
        (["eval", "--run", "/nonexistent/run"], "has no config.yaml"),
    ],
)
def test_cli_errors_are_one_line_exit_2(args, needle, tmp_path):
    if args[0] == "train":
        args = [*args, "--set", f"run.dir={tmp_path / 'run'}"]
    res = run_cli(*args, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_cli_lists(tmp_path):
    res = run_cli("recipes")
    assert res.returncode == 0 and "fashion-mnist-demo" in res.stdout
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("train", "convert", "eval", "recipes", "models"):
        assert cmd in res.stdout


def test_memory_loader_augmentations_are_checked_in_the_config(tmp_path):
    """The device-resident loader's augmentations are refused at load time, before a run directory exists,
    with the key named; the config's list is the loader's own."""
    from trainer.data.memory import MEMORY_AUGMENTS

    assert config.MEMORY_AUGMENTS == MEMORY_AUGMENTS
    for augment in MEMORY_AUGMENTS:
        assert config.load(write(tmp_path, ""), ["data.loader=memory", f"data.augment={augment}"])
    for augment in ("imagenet", "randaugment"):
        with pytest.raises(ConfigError, match=f"data.augment: invalid value '{augment}'; expected one of 'none'"):
            config.load(write(tmp_path, ""), ["data.loader=memory", f"data.augment={augment}"])
        assert config.load(write(tmp_path, ""), [f"data.augment={augment}"]).data.loader == "ffcv"


def test_strict_yaml_load_refuses_a_key_given_twice():
    from trainer.config import DuplicateKeyError, strict_yaml_load

    assert strict_yaml_load("a: 1\nb: {c: 2}\n") == yaml.safe_load("a: 1\nb: {c: 2}\n")
    for text, key, line in [
        ("a: 1\na: 2\n", "a", 2),
        ("s:\n  x: 1\n  y: 2\n  x: 3\n", "x", 4),
        ("s: {x: 1, x: 2}\n", "x", 1),
        ("- {k: 1}\n- {k: 1, k: 2}\n", "k", 2),
        ("'1': a\n'1': b\n", "1", 2),
    ]:
        with pytest.raises(DuplicateKeyError) as info:
            strict_yaml_load(text)
        assert info.value.problem.startswith(f"duplicate key {key!r}"), info.value.problem
        assert info.value.problem_mark.line + 1 == line
        assert isinstance(info.value, yaml.YAMLError)  # callers that report invalid YAML report this too
    # Merge keys are YAML's way to override on purpose: still allowed.
    assert strict_yaml_load("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n")["d"] == {"x": 3, "y": 2}
    # Still a safe loader: no Python objects.
    with pytest.raises(yaml.YAMLError):
        strict_yaml_load("!!python/object/apply:os.system ['true']\n")


def test_strict_yaml_load_refuses_non_string_keys_and_deep_nesting_with_the_line():
    """A key that is not a name, or nesting that would end in a RecursionError (a traceback), is a YAMLError
    with problem_mark, so every caller that reports invalid YAML with its line reports these too."""
    from trainer.config import MAX_YAML_DEPTH, YAMLShapeError, strict_yaml_load

    for text, fragment, line in [
        ("a: 1\n1: b\n", "key '1' is not a string", 2),
        ("s:\n  x: 1\n  true: 2\n", "key 'true' is not a string", 3),
        ("s: {~: 1}\n", "key '~' is not a string", 1),
        ("s:\n  ? [a, b]\n  : 1\n", "key a sequence is not a string", 2),
        ("a: 1\nb: " + "[" * 5000 + "]" * 5000 + "\n", f"nested deeper than {MAX_YAML_DEPTH}", 2),
    ]:
        with pytest.raises(YAMLShapeError) as info:
            strict_yaml_load(text)
        assert fragment in info.value.problem, info.value.problem
        assert info.value.problem_mark.line + 1 == line
    nested = (
        "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, MAX_YAML_DEPTH - 1)) + "  " * MAX_YAML_DEPTH + "v\n"
    )
    assert strict_yaml_load(nested)["a"]["k1"]  # just inside the limit: still read
    # Aliases are visited once: a "billion laughs" document is checked in linear time.
    laughs = "a0: &a0 [x, x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 30))
    assert len(strict_yaml_load(laughs)) == 30


def test_a_recipe_with_a_duplicate_key_is_one_config_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("loop:\n  epochs: 1\n  batch_size: 8\n  epochs: 3\n")
    with pytest.raises(
        ConfigError, match=r"r.yaml' line 4 is not valid YAML: duplicate key 'epochs' \(first at line 2\)"
    ):
        config.load(str(path))
    with pytest.raises(ConfigError, match=r"--set: 'model.kwargs=\{a: 1, a: 2\}': duplicate key 'a'"):
        config.load("debug-cpu", ["model.kwargs={a: 1, a: 2}"])


def test_every_builtin_recipe_reads_strictly():
    from trainer.config import RECIPES_DIR, strict_yaml_load

    for path in RECIPES_DIR.glob("*.yaml"):
        assert isinstance(strict_yaml_load(path.read_text()), dict), path


def _leaf_types(cls=None, prefix=""):
    """(key, type) of every setting of the schema."""
    import dataclasses
    import typing

    cls = cls or config.RunConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_types(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def test_every_float_setting_must_be_finite():
    """Generic over the schema (a new float setting is covered without a new line here): inf and nan are refused
    with the key named, unless the key is in NON_FINITE_OK (none is: an inf anything trains to NaN)."""
    import typing

    floats = []
    for key, tp in _leaf_types():
        args = typing.get_args(tp) if typing.get_origin(tp) is tuple else (tp,)
        if float in args:
            floats.append((key, typing.get_origin(tp) is tuple))
    assert len(floats) >= 19 and not config.NON_FINITE_OK
    for key, is_list in floats:
        for bad in (".inf", "-.inf", ".nan"):
            value = f"[{bad}, {bad}]" if is_list else bad
            with pytest.raises(config.ConfigError) as info:
                config.load("debug-cpu", [f"{key}={value}"])
            assert str(info.value).startswith(key) and "a finite number" in str(info.value), (key, str(info.value))


def test_every_int_setting_must_fit_in_int64():
    keys = [key for key, tp in _leaf_types() if tp is int]
    assert len(keys) >= 20
    for key in keys:
        for bad in (2**63, -(2**63) - 1):
            with pytest.raises(config.ConfigError) as info:
                config.load("debug-cpu", [f"{key}={bad}"])
            assert str(info.value).startswith(key) and "64 bits" in str(info.value), (key, str(info.value))


def test_s3_uri_rules():
    from trainer.storage import parse_s3_uri
    from trainer.validate import split_s3_uri

    for good in ["s3://abc/x", "s3://a.b-c1/x/y/", "s3://gnp-checkpoints", "s3://" + "a" * 63 + "/p"]:
        assert split_s3_uri(good)[2] == "", good
        parse_s3_uri(good)
    for bad in [
        "s3://ab/x",
        "s3://" + "a" * 64 + "/x",
        "s3://Abc/x",
        "s3://a_c/x",
        "s3://-abc/x",
        "s3://abc-/x",
        "s3://a..c/x",
        "s3://a.-c/x",
        "s3://192.168.0.1/x",
        "s3://xn--abc/x",
        "s3://abc-s3alias/x",
        "s3://abc//x",
        "s3://abc/x//y",
        "s3://abc/./x",
        "s3://abc/x/..",
        "s3:///x",
    ]:
        assert split_s3_uri(bad)[2], bad
        with pytest.raises(ValueError, match="checkpoint.uri: invalid value"):
            parse_s3_uri(bad)
