"""What a network takes as input: its tensor's name, size, channels and normalization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
