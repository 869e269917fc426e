"""Background imports must not race the main thread's imports of numpy's C extension."""

from __future__ import annotations

import subprocess
import sys

# The engine runtime loads in the background while the main thread imports faiss:
# before numpy was loaded first, about one start in three failed this way
# (_DeadlockError or a partially initialized numpy._core._multiarray_umath).
SCRIPT = """
import sys
from takeoff_cache.build.preload import preload

loading = preload("onnxruntime", "faiss")
import faiss  # noqa: F401
from takeoff_cache.descriptors import pipeline  # noqa: F401
loading.join()
import onnxruntime  # noqa: F401
print("numpy" in sys.modules and "onnxruntime" in sys.modules)
"""

STARTS = 16


def test_imports_started_in_the_background_never_race_the_main_threads() -> None:
    failures = []
    for _ in range(STARTS):
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0 or proc.stdout.strip() != "True":
            failures.append(proc.stderr.strip().splitlines()[-1:] or proc.stdout)
    assert not failures, failures
