"""Descriptor work on a Dask cluster (prefect-dask): one task run per chunk.

The build's own process stays the driver: it holds the lock, reads tiles,
stores descriptors and writes the index; chunk task runs show in the UI
next to the phase that started them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from takeoff_cache.descriptors import pipeline, scaleout
from takeoff_cache.descriptors.store import DescriptorStore
from takeoff_cache.errors import DescriptorError
from takeoff_cache.tiles.corpus import TileSelection


@task(
    name="embed-chunk",
    task_run_name="embed-chunk-{chunk.number}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
def embed_chunk(engine: scaleout.EngineRef, chunk: scaleout.Chunk) -> scaleout.ChunkResult:
    return scaleout.embed_chunk(engine, chunk)


def embed_on_dask(
    address: str,
    selection: TileSelection,
    corpus_path: Path,
    engine: scaleout.EngineRef,
    space: str,
    store: DescriptorStore,
    progress: pipeline.Progress | None = None,
    stats: scaleout.SpreadStats | None = None,
    *,
    task_runs: bool | None = None,
) -> pipeline.EmbedResult:
    """Embed the selection's missing tiles on the Dask cluster at ``address``.

    With a Prefect server (``PREFECT_API_URL``) each chunk is an ``embed-chunk``
    task run that workers report to it. Prefect's temporary local API lives in
    this process's machine only, and a worker that cannot reach an API starts
    one of its own (seconds each): then chunks run as plain Dask tasks.
    ``task_runs`` forces either way.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect_dask.task_runners import DaskTaskRunner

    if task_runs is None:
        task_runs = bool(PREFECT_API_URL.value())
    try:
        with DaskTaskRunner(address=address) as runner:
            client = runner.client
            # Two chunks per worker thread in flight: one running, one on its way.
            window = 2 * max(1, sum(client.nthreads().values()))

            def submit(chunk: scaleout.Chunk) -> Any:
                if task_runs:
                    return runner.submit(embed_chunk, {"engine": engine, "chunk": chunk})
                # pure=False: a chunk is work to do, never a result to share.
                return client.submit(scaleout.embed_chunk, engine, chunk, pure=False)

            return scaleout.embed_spread(
                selection,
                corpus_path,
                space,
                store,
                submit,
                window=window,
                progress=progress,
                stats=stats,
            )
    except OSError as exc:
        # distributed raises OSError subclasses when no scheduler answers at the address.
        raise DescriptorError(f"descriptors: cannot reach Dask scheduler {address}: {exc}") from exc
