"""Apply deployments/prefect.yaml to the Prefect server at PREFECT_API_URL for one work pool.

    python scripts/deploy.py                   # pool takeoff-cache: the yaml as written
    python scripts/deploy.py --pool jetson-07  # a companion computer's own pool

Creates the (process) work pool if it is missing, then runs
``prefect --no-prompt deploy --all`` from the repository root, so the
deployments record this checkout as the folder workers start flows in.
The pool is created through the API with the process worker's own job
template: ``prefect work-pool create`` would first make the server look up
the integration catalogue on raw.githubusercontent.com.

For a pool other than the yaml's, the deployments are named
``build-cache-<pool>`` and ``watch-corpus-<pool>`` and the rebuild trigger
matches events from watchers that ran on that pool: a corpus change is
rebuilt on the machine that saw it, where the watched paths exist.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
DEFAULT_POOL = "takeoff-cache"


def for_pool(doc: dict[str, Any], pool: str) -> dict[str, Any]:
    """The deployments of ``doc`` retargeted at ``pool``, under names that carry the pool."""
    for deployment in doc["deployments"]:
        deployment["name"] = f"{deployment['name']}-{pool}"
        deployment["work_pool"]["name"] = pool
        for trigger in deployment.get("triggers") or []:
            related = trigger.get("match_related") or {}
            if related.get("prefect.resource.role") == "work-pool":
                related["prefect.resource.name"] = pool
    return doc


def ensure_pool(pool: str) -> None:
    """Create process pool ``pool`` unless it exists; an existing one keeps its settings."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(
                WorkPoolCreate(name=pool, type="process", base_job_template=template)
            )
            print(f"created process work pool {pool!r}")


def prefect(*args: str) -> None:
    prefect_bin = Path(sys.executable).with_name("prefect")
    subprocess.run([str(prefect_bin), "--no-prompt", *args], cwd=ROOT, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default=DEFAULT_POOL, help="process work pool to deploy to")
    args = parser.parse_args()
    if not os.environ.get("PREFECT_API_URL"):
        print("deploy: set PREFECT_API_URL to the server's API, e.g.", file=sys.stderr)
        print("  PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    ensure_pool(args.pool)
    if args.pool == DEFAULT_POOL:
        prefect("deploy", "--prefect-file", str(PREFECT_FILE), "--all")
        return 0
    doc = for_pool(yaml.safe_load(PREFECT_FILE.read_text()), args.pool)
    with tempfile.TemporaryDirectory(prefix="takeoff-cache-deploy-") as tmp:
        retargeted = Path(tmp) / "prefect.yaml"
        retargeted.write_text(yaml.safe_dump(doc, sort_keys=False))
        prefect("deploy", "--prefect-file", str(retargeted), "--all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
