"""Fit a scikit-learn classifier for MLServer's sklearn runtime, in the servers' own environment (so the
pickle is read by the scikit-learn that wrote it):

    python fit_sklearn.py DATA.npz MODEL.joblib SEED

DATA.npz holds x (n, features) and y (n,); the model is an MLP on standardised features."""

from __future__ import annotations

import sys

import joblib
import numpy as np
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

if __name__ == "__main__":
    with np.load(sys.argv[1]) as z:
        x, y = z["x"], z["y"]
    mlp = MLPClassifier((256, 256), max_iter=300, random_state=int(sys.argv[3]), early_stopping=False)
    model = make_pipeline(StandardScaler(), mlp).fit(x, y)
    joblib.dump(model, sys.argv[2])
    print(f"train accuracy {model.score(x, y):.3f}")
