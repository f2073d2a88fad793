"""scikit-learn's bundled 8x8 digits (1,797 samples, offline)."""

from __future__ import annotations

import numpy as np

from ml.data.base import SplitParams, register_digits


@register_digits(
    "digits",
    description="scikit-learn 8x8 handwritten digits (1,797 samples, bundled), stratified split, 10 classes",
    input_shape=(1, 8, 8),
)
def load_digits(p: SplitParams) -> tuple[np.ndarray, np.ndarray]:
    """Pixels 0..16 scaled to [0, 1]; no augmentation (crop_flip's pad 4 would swamp an 8x8 image)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return (bunch.images / 16.0)[:, None, :, :], bunch.target
