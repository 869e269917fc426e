"""The request's field list is defined once (request.REQUEST_FIELDS, options.OPTION_FIELDS);
everything that spells it out again is checked against it here."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import yaml

from takeoff_cache.build.options import OPTION_FIELDS, BuildOptions
from takeoff_cache.build.request import FIELDS, REQUEST_FIELDS, BuildRequest
from takeoff_cache.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = tuple(f.name for f in OPTION_FIELDS)


def _parameters(fn: object) -> tuple[str, ...]:
    return tuple(inspect.signature(getattr(fn, "fn", fn)).parameters)  # type: ignore[arg-type]


def _deployments() -> dict[str, dict]:
    doc = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    return {d["name"]: d for d in doc["deployments"]}


def test_the_request_value_has_exactly_the_listed_fields() -> None:
    assert tuple(f.name for f in dataclasses.fields(BuildRequest)) == FIELDS
    assert {f.name for f in dataclasses.fields(BuildOptions)} == set(OPTIONS)


def test_flow_signatures_are_the_fields_then_the_options() -> None:
    from takeoff_cache_prefect.flows.build import build_cache
    from takeoff_cache_prefect.flows.watch import watch_corpus

    assert _parameters(build_cache) == FIELDS + OPTIONS
    assert _parameters(watch_corpus) == (*FIELDS, "work_dir", "backend")


def test_every_field_and_option_has_its_flag_on_build() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    build = sub.choices["build"]  # type: ignore[attr-defined]
    flags = {opt: action.dest for action in build._actions for opt in action.option_strings}
    for field in (*REQUEST_FIELDS, *OPTION_FIELDS):
        assert flags.get(field.flag) == field.name, field.flag
        assert field.help


def test_deployment_parameters_are_flow_parameters() -> None:
    deployments = _deployments()
    build, watch = deployments["build-cache"], deployments["watch-corpus"]
    assert set(build["parameters"]) <= set(FIELDS + OPTIONS)
    assert set(watch["parameters"]) <= {*FIELDS, "work_dir", "backend"}
    # The rebuild trigger passes on everything the watcher's event carries: every
    # request field, the work folder and the backend.
    (trigger,) = build["triggers"]
    assert set(trigger["parameters"]) == {*FIELDS, "work_dir", "backend"}
    for name, template in trigger["parameters"].items():
        assert template == f"{{{{ event.payload.parameters.{name} }}}}"


def test_the_readme_tables_list_every_field_with_its_flag() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| `(--[a-z-]+)` \|", readme, flags=re.M))
    assert rows == {f.name: f.flag for f in (*REQUEST_FIELDS, *OPTION_FIELDS)}


def test_prepare_flight_takes_the_fields_the_flight_does_not_decide() -> None:
    from takeoff_cache_prefect.flows.prepare import prepare_flight

    from takeoff_cache.prepare import job as prepare

    own = ("plan", "flight", "flights_api", "tiles_url", "tiles_key_header", "tiles_key_param")
    own += ("buffer_m", "max_age_days", "max_tiles", "dry_run", "companion", "work_pool")
    decided = {"bbox", "area", "takeoff_origin", "route"}
    fields = tuple(name for name in FIELDS if name not in decided)
    assert _parameters(prepare_flight) == own + fields + OPTIONS
    # The resolve phase takes its own share of them, by the same names.
    assert set(_parameters(prepare.plan_job)) == set(prepare.JOB_PARAMETERS)
    assert set(prepare.JOB_PARAMETERS) <= set(_parameters(prepare_flight))
    deployment = _deployments()["prepare-flight"]
    assert deployment["entrypoint"] == "flows/prepare.py:prepare_flight"
    # No demo values stand in for what an operator leaves out.
    assert not deployment.get("parameters")
