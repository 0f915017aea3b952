"""Sample images to try the click tool on, from the files scikit-image ships (nothing is downloaded)."""

from __future__ import annotations

from typing import Any

from skimage import data


def coffee() -> list[tuple[Any, dict, str]]:
    """An RGB photo with a few distinct objects: a cup, a saucer, a spoon, coffee beans."""
    return [(data.coffee(), {"name": "coffee", "rgb": True}, "image")]


def coins() -> list[tuple[Any, dict, str]]:
    """A grayscale image of many small, similar objects: a test of one click per object."""
    return [(data.coins(), {"name": "coins"}, "image")]
