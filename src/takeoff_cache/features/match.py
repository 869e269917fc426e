"""A ``matcher`` backbone at work: which of a view's keypoints are which of a place's.

The engine compiled from the matcher (docs/backbones.md) is given the view's
unit descriptors and the place's, each ``(1, N, D)`` float32, and where it
takes them their keypoints ``(1, N, 2)`` as fractions of their image, and
answers ``scores`` ``(1, N, M)``, higher for a likelier pair. A pair matches
when each is the other's best (the mutual argmax) and its score is above 0
(:func:`matches_from_scores`); no ratio test is made on the scores, whose
scale is the network's: a matcher that wants one folds it into its graph, as
it folds its own threshold into "above 0".
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from takeoff_cache.backbones.spec import MatcherInput
from takeoff_cache.core.canonical import content_key
from takeoff_cache.engines.base import Runner
from takeoff_cache.errors import DescriptorError

# What turns the matcher's scores into matches (:func:`matches_from_scores`), part of
# every space that holds what registration decided.
MATCH_RECIPE = "takeoff-cache matches: mutual argmax, score above 0 (1)"


def matches_from_scores(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (row, column) of ``scores`` (N, M) that are each other's best and
    score above 0."""
    n, m = scores.shape
    if n == 0 or m == 0:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty
    scores = np.where(np.isfinite(scores), scores, -np.inf)  # NaN is no match
    best = scores.argmax(axis=1)
    back = scores.argmax(axis=0)
    rows = np.arange(n)
    keep = (back[best] == rows) & (scores[rows, best] > 0)
    return rows[keep], best[keep]


class Matcher:
    """A matcher engine, loaded by ``load()`` when first needed: a build whose self-test
    registers no view again never loads it."""

    def __init__(
        self,
        load: Callable[[], Runner],
        spec: MatcherInput,
        output: str,
        engine_key: str,
        backbone: str,
    ) -> None:
        self._load = load
        self._runner: Runner | None = None
        self._loading = threading.Lock()
        self.spec = spec
        self.output = output
        self.engine_key = engine_key
        self.backbone = backbone

    @property
    def space(self) -> str:
        """Which matchers give the same matches: the engine, how it is fed, the recipe."""
        return content_key(
            {
                "engine_key": self.engine_key,
                "input": self.spec.identity(),
                "output": self.output,
                "recipe": MATCH_RECIPE,
            }
        )

    def identity(self) -> dict[str, Any]:
        """What the manifest records of the matcher: enough to open it again from the
        cache alone (its engine is the engine artifact of this key)."""
        return {
            "backbone": self.backbone,
            "engine_key": self.engine_key,
            "input": self.spec.identity(),
            "output": self.output,
        }

    def _engine(self) -> Runner:
        with self._loading:
            if self._runner is None:
                self._runner = self._load()
            return self._runner

    def scores(
        self,
        view_points: np.ndarray,
        view_units: np.ndarray,
        place_points: np.ndarray,
        place_units: np.ndarray,
    ) -> np.ndarray:
        """The engine's scores (N, M) for the view's N keypoints and the place's M:
        points as fractions of their image (x, y), unit descriptors."""
        spec = self.spec
        feeds = {
            spec.descriptors[0]: view_units[None].astype(np.float32, copy=False),
            spec.descriptors[1]: place_units[None].astype(np.float32, copy=False),
        }
        if spec.keypoints is not None:
            feeds[spec.keypoints[0]] = view_points[None].astype(np.float32, copy=False)
            feeds[spec.keypoints[1]] = place_points[None].astype(np.float32, copy=False)
        out = self._engine().run_feeds(feeds)
        want = (1, len(view_units), len(place_units))
        if out.shape != want:
            raise DescriptorError(
                f"matcher {self.backbone!r}: {self.output!r} of shape {out.shape}, want {want}"
            )
        scores: np.ndarray = out[0]
        return scores

    def match(
        self,
        view_points: np.ndarray,
        view_units: np.ndarray,
        place_points: np.ndarray,
        place_units: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Index pairs (view, place) the matcher pairs (:func:`matches_from_scores`)."""
        if len(view_units) == 0 or len(place_units) == 0:
            empty = np.zeros(0, dtype=np.intp)
            return empty, empty
        return matches_from_scores(self.scores(view_points, view_units, place_points, place_units))
