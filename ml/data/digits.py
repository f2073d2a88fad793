"""scikit-learn's bundled 8x8 digits (1,797 samples, offline)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ml.data.base import Splits, register_dataset, stratified_split


class DigitsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    test_fraction: float = Field(0.25, gt=0, lt=1)
    seed: int = 0


@register_dataset(
    "digits",
    description="scikit-learn 8x8 handwritten digits (1,797 samples, bundled), stratified split, 10 classes",
    params=DigitsParams,
    input_shape=(1, 8, 8),
    num_classes=10,
)
def load_digits(p: DigitsParams) -> Splits:
    """Pixels 0..16 scaled to [0, 1]; no augmentation (crop_flip's pad 4 would swamp an 8x8 image)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.images / 16.0)[:, None, :, :]
    x_train, y_train, x_test, y_test = stratified_split(x, bunch.target, p.test_fraction, p.seed)
    names = [str(i) for i in range(10)]
    return Splits(x_train, y_train, x_test, y_test, class_names=names, augmentation="none")
