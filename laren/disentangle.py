"""DCI of a code space against labelled factors (Eastwood & Williams 2018, "A framework for the quantitative evaluation
of disentangled representations"; the StyleSpace protocol of model-spec 7).

One estimator per factor k predicts the factor from the codes of the training images; the absolute importance of code
dimension i for it is R[i, k]. :func:`laren.metrics.dci` turns R into disentanglement D (does each dimension serve one
factor?) and completeness C (is each factor served by one dimension?); informativeness I is the mean held-out score.

Targets, per factor kind (``prepare_targets``):

- discrete (a synthetic set's classes; a CSV attribute): a classifier; score = held-out accuracy. An attribute whose
  smallest class holds less than ``min_class_share`` of the images is dropped (StyleSpace: > 5 % each side).
- continuous, ``continuous: regress``: a regressor; score = held-out R^2 clipped to [0, 1] (Eastwood & Williams
  report the regression error; R^2 puts it on the accuracy's scale, 1 best).
- continuous, ``continuous: bin``: quantile bins of the whole sample (``bins``), then a classifier; score = accuracy.

Estimators: ``gbt``: scikit-learn GradientBoostingClassifier / Regressor (the reference implementations':
``feature_importances_``, impurity based, summing to 1 per factor); ``lasso``: L1 linear models on codes standardised
with the training images' mean and std (Lasso; L1 logistic regression for classes), importance = |coef| (summed over
classes), scaled to sum 1 per factor as the trees' importances do (else a classifier's large coefficients would
outweigh a regressor's in D). Legend: N images, d code dimensions, K factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor
from sklearn.linear_model import Lasso, LogisticRegression

from laren.config import AnalysisConfig
from laren.metrics import dci


@dataclass
class Target:
    """One factor as the estimators see it: ``task`` classify (integer classes) or regress (float)."""

    name: str
    task: str
    y: np.ndarray


def prepare_targets(labels_nk: np.ndarray, specs: list[dict[str, Any]], acfg: AnalysisConfig
                    ) -> tuple[list[Target], list[str]]:
    """(targets, notes on dropped factors) from labels (N, K) and their specs ({name, kind}; see the module docstring)."""
    targets, dropped = [], []
    for k, spec in enumerate(specs):
        y = np.asarray(labels_nk[:, k], dtype=np.float64)
        name = spec["name"]
        if spec["kind"] == "continuous" and acfg.continuous == "regress":
            if np.ptp(y) <= 0:
                dropped.append(f"{name}: constant")
                continue
            targets.append(Target(name, "regress", y))
            continue
        if spec["kind"] == "continuous":
            edges = np.unique(np.quantile(y, np.linspace(0, 1, acfg.bins + 1)[1:-1]))
            y = np.digitize(y, edges)
        classes, counts = np.unique(y.astype(np.int64), return_counts=True)
        share = counts.min() / len(y)
        if len(classes) < 2 or share < acfg.min_class_share:
            dropped.append(f"{name}: {len(classes)} class(es), smallest {share:.1%} of the images (< "
                           f"{acfg.min_class_share:.0%} or a single class)")
            continue
        targets.append(Target(name, "classify", y.astype(np.int64)))
    return targets, dropped


def split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): a seeded permutation, the first ``test_fraction`` of it for testing."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = min(n - 2, max(2, int(round(n * test_fraction))))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _fit(x_train: np.ndarray, t: Target, acfg: AnalysisConfig):
    """A fitted estimator of target ``t`` and its importances (d,)."""
    classify = t.task == "classify"
    if acfg.estimator == "gbt":
        cls = GradientBoostingClassifier if classify else GradientBoostingRegressor
        est = cls(n_estimators=acfg.gbt_trees, max_depth=acfg.gbt_depth, random_state=acfg.seed).fit(x_train, t.y)
        return est, np.abs(est.feature_importances_)
    if classify:
        est = LogisticRegression(C=1.0 / acfg.lasso_alpha, l1_ratio=1.0, solver="saga", max_iter=2000,
                                 random_state=acfg.seed)
    else:
        est = Lasso(alpha=acfg.lasso_alpha, max_iter=10000, random_state=acfg.seed)
    est.fit(x_train, t.y)
    imp = np.abs(np.atleast_2d(est.coef_)).sum(axis=0)
    return est, imp / imp.sum() if imp.sum() > 0 else imp


def _score(est, x: np.ndarray, y: np.ndarray, task: str) -> float:
    if task == "classify":
        return float(np.mean(est.predict(x) == y))
    return float(np.clip(est.score(x, y), 0.0, 1.0))


def importance_matrix(codes_nd: np.ndarray, targets: list[Target], train: np.ndarray, test: np.ndarray,
                      acfg: AnalysisConfig) -> tuple[np.ndarray, np.ndarray]:
    """(R (d, K), held-out score per factor (K,)) from estimators fitted on the ``train`` rows, scored on ``test``."""
    x = np.asarray(codes_nd, dtype=np.float64)
    if acfg.estimator == "lasso":
        mu, sd = x[train].mean(0), x[train].std(0)
        x = (x - mu) / np.where(sd > 0, sd, 1.0)
    r = np.zeros((x.shape[1], len(targets)))
    scores = np.zeros(len(targets))
    for k, t in enumerate(targets):
        sub = Target(t.name, t.task, t.y[train])
        est, r[:, k] = _fit(x[train], sub, acfg)
        scores[k] = _score(est, x[test], t.y[test], t.task)
    return r, scores


def dci_of_codes(codes_nd: np.ndarray, targets: list[Target], train: np.ndarray, test: np.ndarray,
                 acfg: AnalysisConfig) -> dict[str, Any]:
    """{"D", "C", "I", "R" (d, K), "scores" {factor: held-out score}} of one code space. Dimensions constant over the
    images carry no information and get importance 0 (they count for nothing in D)."""
    r, scores = importance_matrix(codes_nd, targets, train, test, acfg)
    if r.sum() <= 0:  # no estimator found any use for any dimension: nothing is disentangled
        out: dict[str, Optional[float]] = {"D": 0.0, "C": 0.0, "I": float(scores.mean())}
    else:
        out = dci(r, scores)
    return {**out, "R": r, "scores": {t.name: float(s) for t, s in zip(targets, scores)}}
