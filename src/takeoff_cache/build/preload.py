"""Loading slow modules in the background, while the main thread does other work."""

from __future__ import annotations

import contextlib
import importlib
import threading


def preload(*modules: str) -> threading.Thread:
    """Import ``modules`` in a background thread: faiss and an engine runtime each
    take a noticeable part of a small rebuild to import. An import that fails here
    fails again, with its message, where the module is used.

    numpy is imported first, here on the calling thread: the runtimes and the
    decoders all load numpy's C extension, and two threads loading it at once can
    meet in CPython's import locks (a ``_DeadlockError`` or a "partially
    initialized module 'numpy._core._multiarray_umath'" in one of them).
    """
    import numpy  # noqa: F401

    def load() -> None:
        for name in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)

    thread = threading.Thread(target=load, name="preload")
    thread.start()
    return thread
