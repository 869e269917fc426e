"""build-cache and watch-corpus operated through a real Prefect server.

One ``prefect server start`` on 127.0.0.1 for the module, the deployments of
deployments/prefect.yaml applied with ``prefect deploy`` (scripts/deploy.py,
as ``make server`` does), and a real process worker that runs every flow run
in its own process. The corpus-change path is Prefect's own: the watcher
emits an event, the server's triggers service matches the deployment trigger
and creates the build run.

Set TAKEOFF_CACHE_TEST_DATABASE_URL to a ``postgresql+asyncpg://`` URL to run
the same scenario on PostgreSQL (``make test-postgres``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from takeoff_cache.build.request import read_request_file
from takeoff_cache.trust.keys import load_trust_store
from takeoff_cache.trust.verify import verify_cache
from tests.support.procs import CLI, change_one_tile, free_port

ROOT = Path(__file__).resolve().parents[2]
PREFECT = Path(sys.executable).with_name("prefect")
EVENT = "takeoff-cache.corpus.changed"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUN_TIMEOUT_S = 150
# Long enough for the triggers service to act on an event it received: in the
# changed-corpus case it creates the build run within about a second.
NO_TRIGGER_GRACE_S = 5.0


@dataclass
class Stack:
    """A server, its deployments and a worker; ``api`` talks to the server's REST API."""

    url: str
    api: httpx.Client
    root: Path  # demo inputs, cache and work folder


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # Own process group: stopping it also stops the flow-run processes a worker spawned.
    return subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture(scope="module")
def _server_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("prefect-server-home")
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        # The trigger path needs the server's event services: triggers (which
        # also runs the actions) and the persister behind /events/filter.
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5",
        # watch-corpus's interval schedule would start runs on the example
        # (demo) parameters; this test starts every run itself.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        # A run waiting for build-cache's concurrency slot retries after this.
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "0",
    }
    database = os.environ.get("TAKEOFF_CACHE_TEST_DATABASE_URL")
    if database:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
    return env


@pytest.fixture(scope="module")
def _server(_server_env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    log = Path(_server_env["PREFECT_HOME"]) / "server.log"
    url = _server_env["PREFECT_API_URL"]
    host_port = url.removeprefix("http://").removesuffix("/api")
    proc = _start(
        [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", host_port.split(":")[1]],
        _server_env,
        log,
    )
    yield proc  # started now, waited for in `stack`, so demo inputs are made meanwhile
    _stop(proc, signal.SIGTERM)


@pytest.fixture(scope="module")
def stack(
    _server_env: dict[str, str],
    _server: subprocess.Popen[bytes],
    demo_source: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    home = Path(_server_env["PREFECT_HOME"])
    url = _server_env["PREFECT_API_URL"]
    deadline = time.monotonic() + 180
    while True:
        if _server.poll() is not None:
            pytest.fail(f"prefect server exited: {_tail(home / 'server.log')}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"prefect server not healthy: {_tail(home / 'server.log')}")
        time.sleep(0.25)
    deployed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "deploy.py")],
        env=_server_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    worker_log = home / "worker.log"
    worker = _start(
        [str(PREFECT), "worker", "start", "--pool", "takeoff-cache", "--install-policy", "never"],
        _server_env,
        worker_log,
    )
    root = tmp_path_factory.mktemp("served") / "demo"
    shutil.copytree(demo_source, root)
    try:
        with httpx.Client(base_url=url, timeout=30) as api:
            yield Stack(url, api, root)
    finally:
        # SIGINT is the worker's orderly stop; its flow-run processes share its group.
        _stop(worker, signal.SIGINT)


# --- REST helpers ----------------------------------------------------------------------------


def _request(stack: Stack, method: str, path: str, **kwargs: Any) -> httpx.Response:
    # A busy SQLite answers 503 ("database is locked"); Prefect's own client
    # retries those, and so do we. A read can also wait out SQLite's lock
    # timeout without an answer: reads (GET, */filter) are asked again then;
    # a write is not, since it may have been done.
    reads = method == "GET" or path.endswith("/filter")
    for attempt in range(6):
        try:
            response = stack.api.request(method, path, **kwargs)
        except httpx.TimeoutException:
            if not reads or attempt == 5:
                raise
            continue
        if response.status_code not in (429, 503):
            break
        time.sleep(0.5 * 2**attempt)
    return response


def _get(stack: Stack, path: str, **params: str) -> Any:
    response = _request(stack, "GET", path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _post(stack: Stack, path: str, body: dict[str, Any]) -> Any:
    response = _request(stack, "POST", path, json=body)
    assert response.status_code < 300, response.text
    return response.json()


def _deployment(stack: Stack, name: str) -> dict[str, Any]:
    response = _request(stack, "GET", f"/deployments/name/{name}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def _run_deployment(stack: Stack, name: str, parameters: dict[str, Any]) -> str:
    deployment = _deployment(stack, name)
    run = _post(
        stack, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters}
    )
    return str(run["id"])


def _wait(stack: Stack, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        run: dict[str, Any] = _get(stack, f"/flow_runs/{run_id}")
        if run["state"]["type"] in TERMINAL:
            return run
        time.sleep(0.5)
    pytest.fail(f"flow run {run_id} not finished after {RUN_TIMEOUT_S} s")


def _states(stack: Stack, run_id: str) -> list[str]:
    states = _get(stack, "/flow_run_states/", flow_run_id=run_id)
    return [s["name"] for s in states]


def _build_runs(stack: Stack) -> list[dict[str, Any]]:
    deployment = _deployment(stack, "build-cache/build-cache")
    runs: list[dict[str, Any]] = _post(
        stack,
        "/flow_runs/filter",
        {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}},
    )
    return runs


def _events(stack: Stack) -> list[dict[str, Any]]:
    page = _post(stack, "/events/filter", {"filter": {"event": {"name": [EVENT]}}, "limit": 50})
    events: list[dict[str, Any]] = page["events"]
    return events


def _report(stack: Stack, run_id: str) -> dict[str, str]:
    """The build report as the UI shows it: the run's markdown artifact, as field -> value."""
    artifacts = _post(
        stack,
        "/artifacts/filter",
        {"artifacts": {"flow_run_id": {"any_": [run_id]}, "type": {"any_": ["markdown"]}}},
    )
    assert len(artifacts) == 1, artifacts
    rows = [line.strip("|").split("|") for line in artifacts[0]["data"].splitlines()]
    return {r[0].strip(): r[1].strip() for r in rows if len(r) == 2}


def _parameters(stack: Stack) -> dict[str, Any]:
    """The demo request, as an operator passes it with --param: absolute paths, JSON values."""
    raw = read_request_file(stack.root / "request.toml")
    return {**raw, "work_dir": str(stack.root / "work")}


# --- tests -----------------------------------------------------------------------------------


def test_server_runs_without_telemetry_on_the_configured_database(
    stack: Stack, _server_env: dict[str, str]
) -> None:
    settings = _get(stack, "/admin/settings")
    assert settings["server"]["analytics_enabled"] is False
    # SQLite lives in PREFECT_HOME; with a PostgreSQL URL no SQLite file appears.
    sqlite = Path(_server_env["PREFECT_HOME"]) / "prefect.db"
    assert sqlite.is_file() == ("PREFECT_API_DATABASE_CONNECTION_URL" not in _server_env)


def test_deployments_match_prefect_yaml(stack: Stack) -> None:
    build = _deployment(stack, "build-cache/build-cache")
    assert build["entrypoint"] == "flows/build.py:build_cache"
    assert build["work_pool_name"] == "takeoff-cache"
    assert build["global_concurrency_limit"]["limit"] == 1
    assert build["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    watch = _deployment(stack, "watch-corpus/watch-corpus")
    assert watch["entrypoint"] == "flows/watch.py:watch_corpus"
    prepare = _deployment(stack, "prepare-flight/prepare-flight")
    assert prepare["entrypoint"] == "flows/prepare.py:prepare_flight"
    assert [s["schedule"]["interval"] for s in watch["schedules"]] == [900.0]
    automations = _post(stack, "/automations/filter", {})
    trigger = next(a for a in automations if a["name"] == "rebuild-on-corpus-change")
    assert trigger["trigger"]["expect"] == [EVENT]
    assert trigger["actions"][0]["deployment_id"] == build["id"]


def test_changed_tile_triggers_one_rebuild_and_unchanged_corpus_none(stack: Stack) -> None:
    params = _parameters(stack)
    cache = Path(params["cache_root"])

    # A first build from the operator, and a second one started while it runs:
    # the second waits for build-cache's slot instead of failing on the lock.
    first = _run_deployment(stack, "build-cache/build-cache", params)
    second = _run_deployment(stack, "build-cache/build-cache", params)
    for run_id in (first, second):
        run = _wait(stack, run_id)
        assert run["state"]["type"] == "COMPLETED", run["state"]
    assert "AwaitingConcurrencySlot" in _states(stack, first) + _states(stack, second)
    outcomes = sorted(_report(stack, r)["outcome"] for r in (first, second))
    assert outcomes == ["idempotent_no_op", "success"]
    built = verify_cache(cache, load_trust_store(Path(params["trust"])))

    # One tile gets new bytes: the watcher emits the event, the trigger builds.
    change_one_tile(stack.root)
    watcher = _wait(stack, _run_deployment(stack, "watch-corpus/watch-corpus", params))
    assert watcher["state"]["type"] == "COMPLETED", watcher["state"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (new := [r for r in _build_runs(stack) if r["id"] not in (first, second)]):
        assert time.monotonic() < deadline, "the corpus-changed event started no build"
        time.sleep(0.5)
    assert len(new) == 1, new
    triggered = new[0]
    assert triggered["created_by"]["type"] == "AUTOMATION"
    assert triggered["parameters"]["cache_root"] == str(cache)
    rebuilt = _wait(stack, triggered["id"])
    assert rebuilt["state"]["type"] == "COMPLETED", rebuilt["state"]
    report = _report(stack, triggered["id"])
    assert report["outcome"] == "success"
    assert report["descriptors_generated"] == "1"
    manifest = verify_cache(cache, load_trust_store(Path(params["trust"])))
    assert manifest.version == built.version + 1
    assert manifest.signed["corpus"] != built.signed["corpus"]

    deadline = time.monotonic() + 30
    while not (events := _events(stack)):
        assert time.monotonic() < deadline, "the corpus-changed event was not stored"
        time.sleep(0.5)
    assert len(events) == 1
    assert events[0]["resource"]["prefect.resource.id"] == f"takeoff-cache.cache.{cache}"
    assert events[0]["payload"]["previous_fingerprint"] == built.signed["corpus"]["fingerprint"]
    assert events[0]["payload"]["fingerprint"] == manifest.signed["corpus"]["fingerprint"]

    # The corpus is unchanged since that build: no event, no build.
    watcher = _wait(stack, _run_deployment(stack, "watch-corpus/watch-corpus", params))
    assert watcher["state"]["type"] == "COMPLETED", watcher["state"]
    time.sleep(NO_TRIGGER_GRACE_S)
    assert len(_events(stack)) == 1
    assert len(_build_runs(stack)) == 3
    logs = _post(
        stack, "/logs/filter", {"logs": {"flow_run_id": {"any_": [watcher["id"]]}}, "limit": 200}
    )
    assert any("corpus unchanged" in log["message"] for log in logs), json.dumps(logs)[-2000:]


def test_the_prepare_flight_deployment_builds_a_flight_on_the_worker(stack: Stack) -> None:
    from tests.support.tileserver import tile_server

    raw = read_request_file(stack.root / "request.toml")
    cache = stack.root / "prepared"
    cache.mkdir()
    with tile_server() as server:
        params = {
            "plan": str(ROOT / "tests" / "data" / "flights" / "survey_corridor.plan"),
            "tiles_url": server.template,
            # Given, or the deployment's example corpus (the repository's .demo) is used.
            "corpus": str(stack.root / "work" / "tiles" / "fetched.mbtiles"),
            "zoom_levels": [16],
            "buffer_m": 100,
            **{k: raw[k] for k in ("sector_class", "backbones", "precision", "key", "trust")},
            "cache_root": str(cache),
            "work_dir": str(stack.root / "work"),
            # The test tile server repeats six images: no backbone can localize there.
            "min_recall": 0,
        }
        run_id = _run_deployment(stack, "prepare-flight/prepare-flight", params)
        run = _wait(stack, run_id)
        fetched = len(server.tile_requests())
    assert run["state"]["type"] == "COMPLETED", run["state"]
    (artifact,) = _post(
        stack, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    )
    assert fetched > 0, artifact["data"]
    assert artifact["key"].startswith("prepare-report-") and "success" in artifact["data"]
    (build,) = _post(
        stack, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}
    )
    assert build["state"]["type"] == "COMPLETED" and build["parameters"]["area"]
    tasks = _post(stack, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    assert {"resolve", "lock", "download", "verify"} <= {t["name"] for t in tasks}
    manifest = verify_cache(cache, load_trust_store(Path(raw["trust"])))
    assert manifest.signed["corpus"]["tile_count"] == fetched


def _prepare_corridor(raw: dict[str, Any]) -> list[str]:
    """``prepare`` of the sample corridor over the stack's corpus, at zoom 16."""
    return [
        *CLI,
        "prepare", "--plan", str(ROOT / "tests" / "data" / "flights" / "survey_corridor.plan"),
        "--corpus", raw["corpus"], "--zoom", "16", "--buffer-m", "100",
        "--sector", raw["sector_class"], "--backbones", raw["backbones"],
        # The stack's corpus holds a few of the corridor's tiles: accepted knowingly.
        "--allow-gaps",
    ]  # fmt: skip


def test_prepare_builds_through_a_work_pool_worker(
    stack: Stack, _server_env: dict[str, str]
) -> None:
    """``prepare --work-pool``: this side resolves and runs prepare-flight against the
    server; the build is the pool's build-cache deployment, run by its worker."""
    raw = read_request_file(stack.root / "request.toml")
    cache = stack.root / "pooled"
    cache.mkdir()
    argv = [
        *_prepare_corridor(raw),
        "--key", raw["key"], "--trust", raw["trust"], "--cache-root", str(cache),
        "--work-dir", str(stack.root / "work"), "--work-pool", "takeoff-cache", "--json",
    ]  # fmt: skip
    done = subprocess.run(
        argv, env=_server_env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["build"]["outcome"] == "success" and report["verify"]["ok"]
    states = [line for line in done.stderr.splitlines() if "work pool takeoff-cache:" in line]
    assert any(line.endswith(": Running") for line in states), done.stderr[-2000:]
    assert any(line.endswith(": Completed") for line in states), done.stderr[-2000:]
    (run,) = [r for r in _build_runs(stack) if r["parameters"]["cache_root"] == str(cache)]
    assert run["state"]["type"] == "COMPLETED" and run["parent_task_run_id"]
    verify_cache(cache, load_trust_store(Path(raw["trust"])))


def test_prepare_sends_over_ssh_then_builds_on_the_pool_worker(
    stack: Stack, _server_env: dict[str, str], tmp_path: Path
) -> None:
    """``--companion`` with ``--work-pool``: bring-up and transfer over SSH (asyncssh's
    server on 127.0.0.1), the build by the pool's worker with the companion's paths,
    then ``verify --host-check`` over SSH again."""
    from tests.companion.test_companion import Rig

    raw = read_request_file(stack.root / "request.toml")
    rig = Rig(tmp_path, dict(_server_env))
    try:
        argv = [
            *_prepare_corridor(raw),
            "--companion", f"pilot@127.0.0.1:{rig.companion.port}",
            "--companion-cache-root", "~/cache", "--companion-key", "~/operator.key",
            "--companion-trust", "~/trust", "--companion-work-dir", "~/work",
            "--companion-inputs-dir", "~/inputs",
            "--known-hosts", str(rig.client_dir / "known_hosts"),
            "--identity", str(rig.client_dir / "id_ed25519"), "--no-agent",
            "--work-pool", "takeoff-cache", "--work-dir", str(tmp_path / "workstation-work"),
            "--trust", str(rig.workstation_trust),  # the companion's manifest is checked here
            "--json",
        ]  # fmt: skip
        done = subprocess.run(
            argv, env=_server_env, capture_output=True, text=True, timeout=600, check=False
        )
    finally:
        rig.close()
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["companion"]["transfer"]["bytes_sent"] > 0
    assert report["build"]["outcome"] == "success" and report["verify"]["ok"] is True
    assert report["verify"]["workstation"]["ok"] is True
    inputs = rig.companion.root / "inputs"
    (run,) = [
        r for r in _build_runs(stack) if r["parameters"]["corpus"] == f"{inputs}/tiles.mbtiles"
    ]
    assert run["state"]["type"] == "COMPLETED"
    assert run["parameters"]["cache_root"] == str(rig.companion.cache)
    assert (rig.companion.cache / "Manifest.json").is_file()
    # The worker built; SSH only checked, sent and verified.
    assert any(" verify " in c for c in rig.companion.commands)
    assert not any(" build " in c for c in rig.companion.commands)
