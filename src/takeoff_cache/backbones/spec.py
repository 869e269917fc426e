"""What a network takes as input: an image (its tensor's name, size, channels and
normalization), or, for a matcher, two sets of local features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The most keypoints kept of an image: of a tile, and of each scale of a view.
MAX_KEYPOINTS = 256
# The most keypoints a matcher is given on each side (docs/backbones.md): a view's
# three scales of MAX_KEYPOINTS each, and a place's 3 x 3 tiles of MAX_KEYPOINTS each.
# TensorRT's optimization profile for a matcher's keypoint axes is built from them.
VIEW_KEYPOINTS = 3 * MAX_KEYPOINTS
PLACE_KEYPOINTS = 9 * MAX_KEYPOINTS


@dataclass(frozen=True)
class InputSpec:
    name: str
    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def identity(self) -> dict[str, Any]:
        """The spec as it is hashed into build identities and descriptor spaces."""
        return {
            "name": self.name,
            "size": self.size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class MatcherInput:
    """A matcher's inputs (docs/backbones.md): the names of its two descriptor tensors
    (a view's, then a place's; each (B, N, D) float32) and, where it takes them, of
    their keypoints ((B, N, 2), fractions of their image)."""

    descriptors: tuple[str, str]
    keypoints: tuple[str, str] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return self.descriptors + (self.keypoints or ())

    def identity(self) -> dict[str, Any]:
        """The inputs as they are hashed into build identities and engine keys."""
        return {
            "descriptors": list(self.descriptors),
            "keypoints": list(self.keypoints) if self.keypoints is not None else None,
        }
