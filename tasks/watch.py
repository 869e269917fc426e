"""Prefect tasks of the corpus watcher: check the corpus, announce a change."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from takeoff_cache.build import watch
from takeoff_cache.build.request import BuildRequest

CORPUS_CHANGED = "takeoff-cache.corpus.changed"


def cache_resource_id(request: BuildRequest) -> str:
    """The event resource naming one cache; build-cache's trigger matches on it."""
    return f"takeoff-cache.cache.{request.cache_root}"


@task(
    name="check-corpus", task_run_name="check-corpus", cache_policy=NO_CACHE, persist_result=False
)
def check_corpus(request: BuildRequest) -> watch.CorpusCheck:
    return watch.check_corpus(request)


@task(
    name="announce-change",
    task_run_name="announce-change",
    cache_policy=NO_CACHE,
    persist_result=False,
)
def announce_change(
    request: BuildRequest, check: watch.CorpusCheck, build_parameters: dict[str, Any]
) -> str:
    """Emit the corpus-changed event; its payload carries everything build-cache needs."""
    event = emit_event(
        event=CORPUS_CHANGED,
        resource={
            "prefect.resource.id": cache_resource_id(request),
            # The UI shows the name; cache folders are often all called "cache".
            "prefect.resource.name": str(request.cache_root),
            "takeoff-cache.cache-root": str(request.cache_root),
            "takeoff-cache.corpus": str(request.corpus),
        },
        payload={
            "parameters": build_parameters,
            "fingerprint": check.fingerprint,
            "tile_count": check.tile_count,
            "previous_fingerprint": check.built_fingerprint,
            "previous_tile_count": check.built_tile_count,
            "manifest_version": check.manifest_version,
        },
    )
    if event is None:
        # emit_event swallows its own failures; a change nobody hears of must not pass silently.
        raise RuntimeError(f"could not emit {CORPUS_CHANGED}: no Prefect events API is reachable")
    return str(event.id)
