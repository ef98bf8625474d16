"""Typed value rules: each coerces one config value and raises an error naming the key, the value and
the valid range (docs/contract.md §5). The config keys (config.py) and the schedule's arguments (schedule.py) are
checked with the same rules.

Strings are coerced the same strict way SimpleTuner's argparse-fed JSON configs need: booleans from
"true"/"false"/"yes"/"no"/"on"/"off"/"1"/"0" (any case), integers from integer strings ("8", not "8.5"),
numbers from float strings ("0.5", "1e-3"), and "none"/"null" for a nullable rule. A float with an
integral value (100.0) is accepted by an integer rule; a bool is never accepted as a number. Wrong types
raise `TypeError`, out-of-range values `ValueError`.

Scalars are accepted in the types a training script holds them in, as the kernels' own checks accept
them (repa_kernels/checks.py): numpy bools wherever a bool is (a value read from a numpy array or a
pandas sweep table is an np.bool_, not a bool), numpy integers and floats wherever a number is. A tensor
is refused with how to pass its value.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

from ..checks import describe, is_flag

__all__ = ["Bool", "Choice", "Float", "Int", "Rule", "Text", "describe_value"]

TRUE_STRINGS = ("true", "yes", "on", "1")
FALSE_STRINGS = ("false", "no", "off", "0")
NONE_STRINGS = ("none", "null")


def describe_value(value: Any) -> str:
    """`value` and its type as a user writes it (numpy.bool, torch.Tensor), for an error message."""
    return describe(value)


class Rule:
    """A key's rule: `coerce(key, value)` returns the checked value; `describe()` says what is valid."""

    nullable = False

    def describe(self) -> str:
        raise NotImplementedError

    def _coerce_non_null(self, key: str, value: Any) -> Any:
        raise NotImplementedError

    def coerce(self, key: str, value: Any) -> Any:
        if self.nullable and (value is None or (isinstance(value, str) and value.strip().lower() in NONE_STRINGS)):
            return None
        if value is None:
            raise TypeError(f"{key} must be {self.describe()}, got None")
        return self._coerce_non_null(key, value)

    def argparse_type(self, key: str):
        def parse(text: str) -> Any:
            try:
                return self.coerce(key, text)
            except (TypeError, ValueError) as error:
                raise argparse.ArgumentTypeError(str(error)) from None
        parse.__name__ = self.describe()  # argparse shows the type's name in "invalid ... value"
        return parse


@dataclass(frozen=True)
class Bool(Rule):
    def describe(self) -> str:
        return "a bool (true/false)"

    def _coerce_non_null(self, key: str, value: Any) -> bool:
        if is_flag(value):
            return bool(value)
        if isinstance(value, str):
            text = value.strip().lower()
            if text in TRUE_STRINGS:
                return True
            if text in FALSE_STRINGS:
                return False
        raise TypeError(f"{key} must be {self.describe()}, got {describe_value(value)}")


@dataclass(frozen=True)
class Int(Rule):
    minimum: int | None = None
    nullable: bool = False

    def describe(self) -> str:
        text = "an integer" if self.minimum is None else f"an integer >= {self.minimum}"
        return text + (" or None" if self.nullable else "")

    def _coerce_non_null(self, key: str, value: Any) -> int:
        number: int | None = None
        if is_flag(value):
            number = None
        elif isinstance(value, numbers.Integral):
            number = int(value)
        elif isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
            number = int(value)
        elif isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                number = None
        if number is None:
            raise TypeError(f"{key} must be {self.describe()}, got {describe_value(value)}")
        if self.minimum is not None and number < self.minimum:
            raise ValueError(f"{key} must be {self.describe()}, got {number}")
        return number


@dataclass(frozen=True)
class Float(Rule):
    minimum: float | None = None
    minimum_inclusive: bool = True
    maximum: float | None = None
    maximum_inclusive: bool = True
    nullable: bool = False

    def describe(self) -> str:
        bounds = []
        if self.minimum is not None:
            bounds.append(f"{'>=' if self.minimum_inclusive else '>'} {self.minimum:g}")
        if self.maximum is not None:
            bounds.append(f"{'<=' if self.maximum_inclusive else '<'} {self.maximum:g}")
        text = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        return text + (" or None" if self.nullable else "")

    def _coerce_non_null(self, key: str, value: Any) -> float:
        number: float | None = None
        if is_flag(value):
            number = None
        elif isinstance(value, numbers.Real):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None:
            raise TypeError(f"{key} must be {self.describe()}, got {describe_value(value)}")
        in_range = math.isfinite(number)
        if in_range and self.minimum is not None:
            in_range = number >= self.minimum if self.minimum_inclusive else number > self.minimum
        if in_range and self.maximum is not None:
            in_range = number <= self.maximum if self.maximum_inclusive else number < self.maximum
        if not in_range:
            raise ValueError(f"{key} must be {self.describe()}, got {number}")
        return number


@dataclass(frozen=True)
class Choice(Rule):
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        return "one of " + ", ".join(repr(choice) for choice in self.choices)

    def _coerce_non_null(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{key} must be {self.describe()}, got {describe_value(value)}")
        text = value.strip().lower()
        if text not in self.choices:
            raise ValueError(f"{key} must be {self.describe()}, got {value!r}")
        return text


@dataclass(frozen=True)
class Text(Rule):
    what: str = "a non-empty string"

    def describe(self) -> str:
        return self.what

    def _coerce_non_null(self, key: str, value: Any) -> str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise TypeError(f"{key} must be {self.describe()}, got {describe_value(value)}")
        if not value.strip():
            raise ValueError(f"{key} must be {self.describe()}, got {value!r}")
        return value.strip()
