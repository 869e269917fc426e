"""The descriptors phase: a place-recognition descriptor for every selected tile, and their index.

- :mod:`.pipeline`: embed the tiles the store lacks, then write the index (the phase's entry,
  :func:`.pipeline.embed_and_index`);
- :mod:`.decode`: read and decode batches of tiles in worker threads;
- :mod:`.store`: per-tile descriptors kept in the work folder between builds;
- :mod:`.index`: the FAISS index and its row → tile map;
- :mod:`.scaleout`: the same batches embedded in chunks on a Dask cluster.

Callers import the submodule they need: importing this package loads none of them.
"""
