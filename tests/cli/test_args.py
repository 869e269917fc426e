"""Coordinates in the southern and western hemispheres, each as its own argument."""

from __future__ import annotations

import pytest

from takeoff_cache.cli.main import build_parser
from takeoff_cache.errors import InvalidRequestError


@pytest.mark.parametrize("command", ["build", "prepare"])
@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--bbox", "-34.70,-58.50,-34.60,-58.40"),
        ("--bbox", "-33.9,18.4,-33.8,18.5"),
        ("--takeoff-origin", "-33.9,-70.6,120"),
        ("--takeoff-origin", "-1e-3,-0.5, 80"),
    ],
)
def test_a_negative_coordinate_list_is_a_value_not_an_option(
    command: str, flag: str, value: str
) -> None:
    args = build_parser().parse_args([command, flag, value])
    assert getattr(args, flag[2:].replace("-", "_")) == value


def test_a_word_that_is_no_number_list_is_still_an_option() -> None:
    with pytest.raises(InvalidRequestError, match="unrecognized arguments: -58"):
        build_parser().parse_args(["build", "--bbox", "-34.70", "-58"])
    with pytest.raises(InvalidRequestError, match="expected one argument"):
        build_parser().parse_args(["build", "--bbox", "-x1,2"])
