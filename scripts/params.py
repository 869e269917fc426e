"""Print a request TOML as the JSON that ``prefect deployment run --params`` takes.

    prefect deployment run 'build-cache/build-cache' \
        --params "$(.venv/bin/python scripts/params.py mission-42.toml --work-dir /var/cache/tc)"

Every request field is present (absent optional ones as null), so nothing is
left to the deployment's example values; paths are absolute, as the worker
starts flows in another folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from takeoff_cache.build.request import FIELDS, read_request_file
from takeoff_cache.errors import InvalidRequestError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("request", type=Path, help="request TOML (SPEC §2 field names)")
    parser.add_argument("--work-dir", help="work folder on the machine that builds")
    parser.add_argument("--backend", default="auto", help="auto | onnxruntime | tensorrt")
    args = parser.parse_args()
    try:
        raw = read_request_file(args.request)
    except InvalidRequestError as exc:
        print(f"params: {exc}", file=sys.stderr)
        return 2
    params = {name: raw.get(name) for name in FIELDS}
    params["precision"] = params["precision"] or "fp32"
    params["work_dir"] = str(Path(args.work_dir).expanduser().resolve()) if args.work_dir else None
    params["backend"] = args.backend
    print(json.dumps(params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
