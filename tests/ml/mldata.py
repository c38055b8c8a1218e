"""Synthetic data shared by the tests of tests/ml (a module of its own: conftest modules are not importable)."""

from __future__ import annotations

from typing import Any

import numpy as np

ROWS = 256
COLS = ["a", "b", "c", "d"]


def synthetic(seed: int = 7) -> Any:
    """256 rows, 4 raw features on different scales, a separable 2-class ``label`` and a linear ``target``."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    scale, shift = np.array([1.0, 3.0, 0.5, 2.0]), np.array([5.0, -2.0, 0.0, 1.0])
    x = rng.normal(size=(ROWS, 4)) * scale + shift
    logit = (x - shift) / scale @ np.array([1.5, -2.0, 1.0, 0.0])
    frame = pd.DataFrame(x, columns=COLS)
    frame["label"] = (logit > 0).astype("float64")
    frame["target"] = logit + rng.normal(scale=0.1, size=ROWS)
    return frame
