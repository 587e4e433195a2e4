import math
from dataclasses import fields
from pathlib import Path

import pytest

from cola_hf.config import OPTION_RANGES, check_range, make_parser, option_specs, parse_args
from cola_hf.errors import UsageError

RECIPES = Path(__file__).resolve().parents[1] / "experiments" / "recipes"
TUTORIAL_HYPERPARAMETERS = {
    "optim": "adamw_torch_fused",
    "learning_rate": 2e-5,
    "adam_epsilon": 1e-8,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "weight_decay": 0.0,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "max_grad_norm": 1.0,
    "per_device_train_batch_size": 32,
    "num_train_epochs": 4,
    "seed": 42,
    "eval_strategy": "epoch",
}


def field_values(arguments) -> dict:
    return {field.name: getattr(arguments, field.name) for field in fields(arguments)}


def as_plain(value):
    return getattr(value, "value", value)  # enums such as SchedulerType compare by their string


def test_defaults_are_the_tutorial_recipe():
    options = parse_args([])
    data_args, training_args = options.data, options.training
    for name, expected in TUTORIAL_HYPERPARAMETERS.items():
        assert as_plain(getattr(training_args, name)) == expected, name
    assert data_args.max_seq_length == 64 and data_args.validation_fraction == 0.1


def test_tutorial_yaml_only_restates_the_defaults():
    """The recipe file documents the defaults; parsing it must change nothing but output_dir."""
    defaults = [field_values(group) for group in parse_args([]).groups()]
    from_recipe = [field_values(group) for group in parse_args([str(RECIPES / "tutorial.yaml")]).groups()]
    differing = {
        key
        for default, recipe in zip(defaults, from_recipe, strict=True)
        for key in default
        if as_plain(default[key]) != as_plain(recipe[key])
    }
    assert differing <= {"output_dir", "logging_dir", "run_name"}


@pytest.mark.parametrize("recipe", sorted(path.name for path in RECIPES.glob("*.yaml")))
def test_every_recipe_parses_and_names_its_source(recipe):
    """A recipe is options a run accepts, with where its values come from in a comment."""
    text = (RECIPES / recipe).read_text(encoding="utf-8")
    assert text.startswith("# ") and ("Source:" in text or recipe == "tutorial.yaml")
    options = parse_args([str(RECIPES / recipe)])
    assert options.recipe == recipe.removesuffix(".yaml")


def test_flags_override_the_recipe():
    training_args = parse_args([str(RECIPES / "tutorial.yaml"), "--num_train_epochs", "2"]).training
    assert training_args.num_train_epochs == 2
    assert training_args.learning_rate == 2e-5


def test_recipe_with_unknown_key_is_a_one_line_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("learning_rate: 3.0e-5\nlerning_rate: 1\n")
    with pytest.raises(UsageError, match=r"bad\.yaml: unknown option 'lerning_rate'"):
        parse_args([str(recipe)])


def test_recipe_values_are_type_checked_like_flags(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("num_train_epochs: four\n")
    with pytest.raises(UsageError, match=r"bad\.yaml: option 'num_train_epochs' expects a number, found 'four'"):
        parse_args([str(recipe)])


def test_every_interface_flag_exists():
    flags = {action.dest for action in make_parser()._actions}
    assert {"cola_source", "model_name_or_path", "max_seq_length", "pad_to_max_length", "do_train"} <= flags


def edges(name: str) -> tuple[list[float], list[float]]:
    """The values just inside and just outside each finite end of `name`'s range, and its special values."""
    allowed = OPTION_RANGES[name]
    step = 1 if name in INTEGER_OPTIONS else 1e-9
    inside, outside = list(allowed.also), []
    for end, open_, direction in ((allowed.low, allowed.low_open, 1), (allowed.high, allowed.high_open, -1)):
        if math.isfinite(end):
            (outside if open_ else inside).append(end)
            (inside if open_ else outside).append(end + direction * step if open_ else end - direction * step)
    return inside, [value for value in outside if value not in allowed.also]


INTEGER_OPTIONS = {name for name, spec in option_specs().items() if spec.convert is int}


@pytest.mark.parametrize("name", sorted(OPTION_RANGES))
def test_every_range_takes_its_ends_and_refuses_what_lies_just_beyond(name):
    inside, outside = edges(name)
    assert inside and outside  # every range has an end to test
    for value in inside:
        check_range(name, value)
    for value in outside:
        with pytest.raises(UsageError, match=f"^--{name} .*: out of range, expected "):
            check_range(name, value)
