"""Prefect artifacts: their keys, the coverage map inline, the report readable back."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any


def artifact_key(prefix: str, cache_root: Path) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(cache_root).lower()).strip("-")
    return f"{prefix}-{slug}"[-100:].lstrip("-")


# A map above this is linked by its path only: the artifact lives in Prefect's database.
MAX_EMBEDDED_MAP = 2 * 1024 * 1024


def embedded_map(path: str | None) -> str:
    """The coverage map inline, as a data: URI image: the Prefect UI renders markdown
    images but cannot fetch a file from the build machine's work folder."""
    if not path:
        return ""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    if len(data) > MAX_EMBEDDED_MAP:
        return f"\ncoverage map: `{path}`\n"
    return f"\n![coverage map](data:image/png;base64,{base64.b64encode(data).decode()})\n"


REPORT_BLOCK = re.compile(r"```json takeoff-cache-report\n(.*?)\n```", re.S)


def report_block(report: dict[str, Any]) -> str:
    """The report as JSON, fenced: what a caller on another machine reads back
    (``prepare --work-pool``), since a deployment run's result stays on its worker."""
    return f"\n```json takeoff-cache-report\n{json.dumps(report)}\n```\n"


def read_report_block(markdown: str) -> dict[str, Any] | None:
    match = REPORT_BLOCK.search(markdown)
    if match is None:
        return None
    data: dict[str, Any] = json.loads(match.group(1))
    return data
