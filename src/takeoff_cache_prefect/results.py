"""What the build's tasks ask of Prefect's result store and argument handling."""

from __future__ import annotations

import contextlib
from typing import Any, ParamSpec, TypeVar, cast

from prefect import Flow
from prefect.results import get_result_store
from prefect.transactions import get_transaction
from prefect.utilities.annotations import quote

from takeoff_cache.tiles import corpus

P = ParamSpec("P")
R = TypeVar("R")


def file_for_the_next_build(key: str, result: object) -> None:
    """File a cached task's ``result`` in Prefect's result store under ``key``: the
    cache key the next run will compute from the files this run has just written.

    Such a key holds the files' digests, so the run's own key was computed before
    they were written (None when they did not exist yet); without this, only the
    second run after them would find the result cached. Nothing is done when the
    run's own key is already ``key`` (Prefect files it when the run commits). The
    cache is only an accelerator: a store that refuses is no reason to fail a build.
    """
    transaction = get_transaction()
    if transaction is not None and transaction.key == key:
        return
    with contextlib.suppress(OSError):
        get_result_store().write(obj=result, key=key)


def untracked(selection: corpus.TileSelection) -> corpus.TileSelection:
    """The selection, passed to a task without Prefect walking each of its tiles.

    Prefect visits every element of a task's arguments (looking for upstream
    futures) twice per call: seconds for 50 000 tiles. ``quote`` is its
    documented way out; the task still receives the selection itself.
    """
    return cast(corpus.TileSelection, quote(selection))


def json_parameters(flow: Flow[P, R]) -> Flow[P, R]:
    """``flow``, recording its parameters in the run as they are when they are JSON
    already (strings, numbers, lists, tables: every parameter of our flows).

    Prefect passes each parameter through FastAPI's encoder before recording the run,
    and importing FastAPI for it cost each command-line run about 0.15 s before its
    flow could start. A parameter that is not JSON still goes through the encoder.
    """
    encode = flow.serialize_parameters

    def serialize(parameters: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in parameters.items() if _is_json(v, MAX_PARAMETER_DEPTH)}
        rest = {k: v for k, v in parameters.items() if k not in out}
        return {**out, **(encode(rest) if rest else {})}

    flow.serialize_parameters = serialize  # type: ignore[method-assign]
    return flow


MAX_PARAMETER_DEPTH = 32


def _is_json(value: object, depth: int) -> bool:
    if value is None or isinstance(value, str | bool | int | float):
        return True
    if depth <= 0:
        return False
    if isinstance(value, list):
        return all(_is_json(v, depth - 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v, depth - 1) for k, v in value.items())
    return False
