"""scikit-learn's bundled 8x8 digits (1,797 samples, offline)."""

from __future__ import annotations

from ml.data.base import SplitParams, Splits, digit_splits, register_dataset


@register_dataset(
    "digits",
    description="scikit-learn 8x8 handwritten digits (1,797 samples, bundled), stratified split, 10 classes",
    params=SplitParams,
    input_shape=(1, 8, 8),
    num_classes=10,
)
def load_digits(p: SplitParams) -> Splits:
    """Pixels 0..16 scaled to [0, 1]; no augmentation (crop_flip's pad 4 would swamp an 8x8 image)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return digit_splits((bunch.images / 16.0)[:, None, :, :], bunch.target, p)
