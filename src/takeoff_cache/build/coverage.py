"""The coverage phase: nothing may fly that the new manifest does not vouch for.

Files only the previous manifest lists are accounted for (commit deletes
them), and so is whatever stands at a path the new manifest lists (commit
renames the new file over it: a symlink there is replaced, never followed);
any other file, or anything else that is not a regular file, is a violation.
"""

from __future__ import annotations

from pathlib import Path

from takeoff_cache.core.layout import walk_cache
from takeoff_cache.errors import CoverageError

_SHOWN = 20


def check_coverage(cache_root: Path, new_paths: set[str], old_paths: set[str]) -> list[str]:
    """Return the offending paths (empty when covered)."""
    entries = walk_cache(cache_root)
    unlisted = [p for p in entries.files if p not in new_paths and p not in old_paths]
    strange = [f"{p} (not a regular file)" for p in entries.others if p not in new_paths]
    return sorted(unlisted + strange)


def enforce(cache_root: Path, offending: list[str]) -> None:
    if offending:
        shown = ", ".join(offending[:_SHOWN])
        more = f" and {len(offending) - _SHOWN} more" if len(offending) > _SHOWN else ""
        raise CoverageError(
            f"coverage: {len(offending)} file(s) in {cache_root} are not listed in the manifest:"
            f" {shown}{more}; remove them or build with --coverage lenient",
            offending,
        )
