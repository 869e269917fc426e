"""locate's confidence: how it speaks of views of the cache's own world and of another.

    python benchmarks/confidence.py [--tiles 320] [--views 200] [--data DIR]

Builds the demo cache (seed 0, default self-test: it calibrates and signs the
rule), then writes ``--views`` drone-like JPEG views (as the self-test draws
them: any heading, scale 0.7-1.4, offset, blur, light, noise, JPEG) of

- the cache's own world, drawn with another seed than the build's self-test;
- another synthetic world (seed 11) around Sydney, at the same zooms;

and runs ``locate`` on every one. Prints the signed rule, then for each set
the share called confident, ambiguous and outside; for the own world, how
many confident answers are right (the top tile is the view's tile or one of
its 8 neighbours). Ends with one JSON line.

Measured (320 tiles, seed 0, 200 views each; the figures do not depend on the
host): the signed rule was confident below a ratio of 0.7923 and outside from
0.8549. Of the other world's views 93.0% were outside, 5.5% ambiguous and 1.5%
confident (3 views). Of the cache's own views 48.5% were confident, and 98.97%
of those were right (all views: 79.5% right at rank 1); 10% were ambiguous
and 41.5% outside: the demo backbone tells four in ten of its own views no
better from elsewhere than views of elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")

from views import write_views  # noqa: E402  (benchmarks/views.py)

from takeoff_cache.cli.main import main as cli  # noqa: E402
from takeoff_cache.demo import make_demo_data  # noqa: E402
from takeoff_cache.demo.synthetic import write_corpus  # noqa: E402
from takeoff_cache.localize.locate import CONFIDENT, OUTSIDE, locate, near  # noqa: E402
from takeoff_cache.trust.keys import load_trust_store  # noqa: E402

TileKey = tuple[int, int, int]


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def shares(said: list[str | None]) -> dict[str, float]:
    return {c: round(said.count(c) / len(said), 4) for c in (CONFIDENT, "ambiguous", OUTSIDE)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiles", type=int, default=320)
    p.add_argument("--views", type=int, default=200)
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "takeoff-bench")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="confidence-") as tmp_name:
        tmp = Path(tmp_name)
        src = make_demo_data(args.data / f"confidence-{args.tiles}", tiles=args.tiles)
        root = Path(shutil.copytree(src.root, tmp / "demo"))
        request, work = str(root / "request.toml"), str(tmp / "work")
        with contextlib.redirect_stdout(sys.stderr):  # stdout: this benchmark's JSON line
            built = cli(["build", "--request", request, "--work-dir", work])
        if built != 0:
            raise SystemExit("the demo build failed")
        doc = json.loads((root / "cache" / "Manifest.json").read_text())
        test = doc["signed"]["self_test"]
        log(f"self-test: {test['k']} views, Recall@1 {test['recall_at_1']}")
        log(f"signed rule: {json.dumps(test['confidence'])}")
        elsewhere = write_corpus(
            tmp / "elsewhere.mbtiles", n_tiles=args.tiles, seed=11, center=(-33.87, 151.21)
        ).path
        trusted = load_trust_store(root / "trust")
        figures: dict[str, Any] = {"rule": test["confidence"]}
        for name, corpus in (("own", root / "corpus.mbtiles"), ("elsewhere", elsewhere)):
            views = write_views(corpus, f"confidence {name}", args.views, tmp / name)
            found = locate(root / "cache", [path for path, _ in views], trusted)
            said = [loc.confidence for loc in found]
            entry: dict[str, Any] = {"views": len(views), **shares(said)}
            if name == "own":
                right = [
                    near(view.tile, (loc.matches[0].z, loc.matches[0].x, loc.matches[0].y))
                    and loc.matches[0].z == view.tile[0]
                    for loc, (_, view) in zip(found, views, strict=True)
                ]
                sure = [r for r, c in zip(right, said, strict=True) if c == CONFIDENT]
                entry["right_at_1"] = round(sum(right) / len(right), 4)
                entry["confident_right"] = round(sum(sure) / len(sure), 4) if sure else None
            figures[name] = entry
            log(f"{name}: {json.dumps(entry)}")
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
