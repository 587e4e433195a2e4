"""A W&B sweep file as an Optuna search space.

One file serves both `wandb agent` (with a W&B server) and the local Optuna search (`--search FILE`):

    method: grid | random | bayes          -> GridSampler | RandomSampler | TPESampler (study.py)
    metric: {name: eval/matthews_correlation, goal: maximize}   -> the objective (objective.py)
    parameters:
      learning_rate: {distribution: log_uniform_values, min: 1.0e-5, max: 3.0e-4}
      global_train_batch_size: {values: [16, 32]}
      num_train_epochs: {distribution: int_uniform, min: 2, max: 5}

Every parameter is an option of experiments/cola.py, and every value goes through that option's own argparse
type, as the W&B agent's `--name=value` flags would: a value the run would refuse is refused here, before any
trial starts. A distribution Optuna cannot draw the same way is refused too, rather than silently changed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)
from optuna.trial import Trial

from cola_hf.config import OptionSpec, check_range, option_specs
from cola_hf.errors import UsageError
from cola_hf.file_io import read_yaml
from cola_hf.studies.search.objective import VALIDATION_MCC, Objective, from_sweep

METHODS = ("grid", "random", "bayes")
# W&B distributions with an exact Optuna counterpart; the others (normal, beta, inv_log_uniform...) have none.
DISTRIBUTIONS = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
)
Choice = None | bool | int | float | str  # what Optuna stores for a categorical choice


@dataclass(frozen=True)
class Parameter:
    """One searched option: how Optuna draws it, and how a drawn value becomes the option's value."""

    name: str
    distribution: BaseDistribution
    convert: Callable[[str], Any]

    def suggest(self, trial: Trial) -> Any:
        distribution = self.distribution
        if isinstance(distribution, CategoricalDistribution):
            return trial.suggest_categorical(self.name, distribution.choices)
        if isinstance(distribution, IntDistribution):
            return trial.suggest_int(
                self.name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
            )
        return trial.suggest_float(
            self.name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )

    def option_value(self, drawn: Any) -> Any:
        """The option's value for a value Optuna drew: through the option's type, like a command-line flag."""
        if isinstance(drawn, float) and drawn.is_integer() and self.convert is int:
            drawn = int(drawn)
        return self.convert(str(drawn))

    def grid_values(self) -> list[Choice] | None:
        """Every value, when the distribution has finitely many (None for a continuous one)."""
        distribution = self.distribution
        if isinstance(distribution, CategoricalDistribution):
            return list(distribution.choices)
        if isinstance(distribution, IntDistribution) and not distribution.log:
            return list(range(distribution.low, distribution.high + 1, distribution.step))
        if isinstance(distribution, FloatDistribution) and distribution.step is not None:
            count = round((distribution.high - distribution.low) / distribution.step) + 1
            return [distribution.low + index * distribution.step for index in range(count)]
        return None

    def upper_bound(self) -> Any:
        distribution = self.distribution
        if isinstance(distribution, CategoricalDistribution):
            return max(distribution.choices)
        return distribution.high


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    method: str
    parameters: dict[str, Parameter]
    objective: Objective = VALIDATION_MCC  # what the search optimises: the sweep file's `metric:`

    def suggest(self, trial: Trial) -> dict[str, Any]:
        """Draw every parameter for `trial`; return the options' values (converted by their types)."""
        return {name: parameter.option_value(parameter.suggest(trial)) for name, parameter in self.parameters.items()}

    def option_values(self, params: dict[str, Any]) -> dict[str, Any]:
        """The options' values for a trial's stored `params`."""
        return {name: self.parameters[name].option_value(value) for name, value in params.items()}

    def grid(self) -> dict[str, list[Choice]]:
        """The grid GridSampler walks: every finite parameter's values (a grid has only finite ones)."""
        return {name: parameter.grid_values() or [] for name, parameter in self.parameters.items()}

    def grid_size(self) -> int:
        return math.prod(len(values) for values in self.grid().values())

    def fingerprint(self) -> dict[str, str]:
        """The space as Optuna stores distributions: a resumed search must search the same space."""
        return {"method": self.method, **{n: distribution_to_json(p.distribution) for n, p in self.parameters.items()}}


def load_space(
    path: str | Path, parser: argparse.ArgumentParser | None = None, method: str | None = None
) -> SearchSpace:
    """Read a W&B sweep file into a SearchSpace; `method` (grid for --grid) must match the file's, if given.

    Every mistake is a UsageError naming the file and the parameter.
    """
    path = Path(path)
    where = f"{path}:"
    sweep = read_yaml(path, "the sweep file")
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict) or not sweep["parameters"]:
        raise UsageError(f"{where} expected a W&B sweep file: a mapping with a non-empty 'parameters' mapping")
    sweep_method = sweep.get("method")
    if sweep_method not in METHODS:
        raise UsageError(f"{where} method is {sweep_method!r}; expected one of {', '.join(METHODS)}")
    if method is not None and sweep_method != method:
        raise UsageError(f"{where} method is {sweep_method!r}; --grid runs a grid (use --search for the others)")
    objective = from_sweep(path, sweep.get("metric"))
    options = option_specs(parser)
    parameters = {}
    for name, spec in sweep["parameters"].items():
        if name not in options:
            raise UsageError(f"{where} '{name}' is not an option of experiments/cola.py (see --help)")
        if options[name].roles & {"local", "unsearchable"}:  # config.OPTION_ROLES
            raise UsageError(f"{where} '{name}' cannot be searched: the search sets it for every trial")
        parameters[name] = parse_parameter(path, name, spec, options[name])
    space = SearchSpace(path, sweep_method, parameters, objective)
    if sweep_method == "grid":
        for name, parameter in parameters.items():
            if parameter.grid_values() is None:
                raise UsageError(
                    f"{where} parameter '{name}': a grid needs finitely many values "
                    "('values', 'value', int_uniform or q_uniform)"
                )
    return space


def parse_parameter(path: Path, name: str, spec: Any, option: OptionSpec) -> Parameter:
    where = f"{path}: parameter '{name}':"
    if not isinstance(spec, dict):
        raise UsageError(f"{where} expected a mapping such as {{values: [...]}}, found {spec!r}")
    if "parameters" in spec:
        raise UsageError(f"{where} nested parameters are not options of a run")
    if "probabilities" in spec:
        raise UsageError(f"{where} 'probabilities' has no Optuna equivalent; list values to draw them uniformly")
    if option.takes_list:
        raise UsageError(f"{where} the option takes a list of values; a search varies single-valued options")
    convert = option.convert
    distribution = spec.get("distribution") or infer_distribution(spec)
    if distribution not in DISTRIBUTIONS:
        raise UsageError(
            f"{where} distribution {distribution!r} has no Optuna equivalent here; "
            f"use one of {', '.join(DISTRIBUTIONS)}"
        )
    if distribution in ("constant", "categorical"):
        if distribution == "constant" and "value" not in spec:
            raise UsageError(f"{where} a constant needs 'value'")
        values = [spec["value"]] if distribution == "constant" else spec.get("values")
        if not isinstance(values, list) or not values:
            raise UsageError(f"{where} 'values' must be a non-empty list")
        choices = [categorical_choice(where, option, value) for value in values]
        check_range(name, [choice for choice in choices if isinstance(choice, int | float)], f"{where} ")
        if len(set(map(repr, choices))) != len(choices):
            raise UsageError(f"{where} 'values' lists a value twice")
        return Parameter(name, CategoricalDistribution(choices), convert)

    low, high = (bound(where, spec, key) for key in ("min", "max"))
    if low > high:
        raise UsageError(f"{where} min {low:g} is greater than max {high:g}")
    if distribution == "int_uniform":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise UsageError(f"{where} int_uniform needs integer min and max")
        return Parameter(name, IntDistribution(int(low), int(high)), checked(where, name, convert, int(low), int(high)))
    if convert is int:
        raise UsageError(f"{where} the option takes integers; {distribution} draws fractions (use int_uniform)")
    if distribution == "uniform":
        return Parameter(name, FloatDistribution(low, high), checked(where, name, convert, low, high))
    if distribution == "q_uniform":
        step = float(spec.get("q", 1))
        if step <= 0 or not math.isclose((high - low) / step, round((high - low) / step)):
            raise UsageError(f"{where} q must be positive and divide max - min")
        return Parameter(name, FloatDistribution(low, high, step=step), checked(where, name, convert, low, high))
    if distribution == "log_uniform":  # W&B: min and max are natural logarithms of the bounds
        low, high = math.exp(low), math.exp(high)
    convert = checked(where, name, convert, low, high)
    if low <= 0:
        raise UsageError(f"{where} a log range needs min > 0, found {low:g}")
    return Parameter(name, FloatDistribution(low, high, log=True), convert)


def infer_distribution(spec: dict) -> str:
    """W&B's own rule when 'distribution' is left out."""
    if "values" in spec:
        return "categorical"
    if "value" in spec:
        return "constant"
    integers = all(isinstance(spec.get(key), int) and not isinstance(spec.get(key), bool) for key in ("min", "max"))
    return "int_uniform" if integers else "uniform"


def bound(where: str, spec: dict, key: str) -> float:
    if key not in spec:
        raise UsageError(f"{where} needs '{key}' (or 'values')")
    try:
        value = float(str(spec[key]))  # str first: YAML reads 1e-5 (no dot) as a string
    except ValueError:
        raise UsageError(f"{where} {key} must be a number, found {spec[key]!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"{where} {key} must be finite, found {spec[key]!r}")
    return value


def categorical_choice(where: str, option: OptionSpec, value: Any) -> Choice:
    if isinstance(value, dict | list):
        raise UsageError(f"{where} each value must be a single value, found {value!r}")
    converted = convert_token(where, option.convert, str(value))
    if option.choices is not None and converted not in option.choices:
        raise UsageError(f"{where} {value!r} is not one of {list(option.choices)}")
    # Optuna stores categorical choices as JSON; anything richer (an enum) is kept as the flag's text.
    return converted if converted is None or isinstance(converted, bool | int | float | str) else str(value)


def checked(where: str, name: str, convert: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    """`convert`, once a range's bounds are known to be values the option takes, in its allowed range."""
    check_range(name, [low, high], f"{where} ")
    for value in (low, high):
        convert_token(where, convert, str(value))
    return convert


def convert_token(where: str, convert: Callable[[str], Any], token: str) -> Any:
    try:
        return convert(token)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise UsageError(f"{where} the option does not take {token!r} ({err})") from None
