"""DCI (laren.metrics.dci + laren.disentangle): the formula against hand values and the reference definitions
(google-research/disentanglement_lib dci.py: scipy entropies, importance-weighted sums), and the estimators on codes
built from known factors by a known mixing."""

import numpy as np
import pytest
from scipy.stats import entropy

from laren import disentangle as DI
from laren.config import AnalysisConfig, AnalysisTarget
from laren.metrics import dci

ACFG = AnalysisConfig(checkpoints=[AnalysisTarget(label="x", checkpoint="x")])


def test_dci_hand_computed_importance_matrix():
    # 3 codes x 2 factors: code 0 serves factor 0 only, code 1 factor 1 only, code 2 both (1 : 2).
    r = np.array([[0.8, 0.0], [0.0, 0.6], [0.2, 0.4]])
    # D: code weights rho = (0.8, 0.6, 0.6) / 2 = (0.4, 0.3, 0.3); H_2 of the rows: 0, 0, H(1/3, 2/3) = 0.918296
    #    D = 0.4 + 0.3 + 0.3 * (1 - 0.918296) = 0.724511
    # C: factor weights (1.0, 1.0) / 2; H_3 of the columns: H(0.8, 0.2) / ln 3 = 0.455486, H(0.6, 0.4) / ln 3 = 0.612602
    #    C = 0.5 * (1 - 0.455486) + 0.5 * (1 - 0.612602) = 0.465956
    out = dci(r, [0.9, 0.7])
    assert out["D"] == pytest.approx(0.724511, abs=1e-6)
    assert out["C"] == pytest.approx(0.465956, abs=1e-6)
    assert out["I"] == pytest.approx(0.8)


def _reference(r):
    """disentanglement_lib's definitions, written with scipy's entropy (which normalises its input)."""
    per_code = 1 - entropy(r.T + 1e-11, base=r.shape[1])
    per_factor = 1 - entropy(r + 1e-11, base=r.shape[0])
    return (per_code * r.sum(1) / r.sum()).sum(), (per_factor * r.sum(0) / r.sum()).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dci_equals_the_reference_definitions(seed):
    rng = np.random.default_rng(seed)
    r = rng.random((12, 5)) ** 3  # skewed, as importances are
    r[3] = 0.0  # an unused code dimension
    d_ref, c_ref = _reference(r)
    out = dci(r, np.full(5, 0.5))
    assert out["D"] == pytest.approx(d_ref, abs=1e-8)
    assert out["C"] == pytest.approx(c_ref, abs=1e-8)


def _factors(n=400, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.uniform(-1, 1, (n, 3))
    f[:, 2] = rng.integers(0, 3, n)  # a discrete factor with 3 classes
    specs = [{"name": "a", "kind": "continuous"}, {"name": "b", "kind": "continuous"},
             {"name": "c", "kind": "discrete"}]
    return f, specs, rng


@pytest.mark.parametrize("estimator", ["gbt", "lasso"])
def test_estimators_see_a_known_mixing(estimator):
    """Codes = factors (one dimension each) + pure-noise dimensions: D and C near 1, I high. Codes = a rotation that
    mixes every factor into every dimension: D and C fall, I stays."""
    f, specs, rng = _factors()
    acfg = ACFG.model_copy(update={"estimator": estimator, "gbt_trees": 30, "lasso_alpha": 0.01})
    targets, dropped = DI.prepare_targets(f, specs, acfg)
    assert [t.task for t in targets] == ["regress", "regress", "classify"] and not dropped
    train, test = DI.split(len(f), 0.5, 0)
    scaled = f - f.mean(0)
    clean = np.concatenate([scaled, 0.01 * rng.standard_normal((len(f), 2))], axis=1)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    mixed = scaled @ (q * np.sign(np.diag(q)))  # every factor in every dimension
    a = DI.dci_of_codes(clean, targets, train, test, acfg)
    b = DI.dci_of_codes(mixed, targets, train, test, acfg)
    assert a["R"].shape == (5, 3)
    assert a["D"] > 0.85 and a["C"] > 0.85, a
    assert a["I"] > 0.9 and b["I"] > 0.6, (a, b)
    assert b["D"] < a["D"] - 0.3 and b["C"] < a["C"] - 0.3, (a["D"], b["D"], a["C"], b["C"])
    assert np.argmax(a["R"], axis=0).tolist() == [0, 1, 2]  # each factor's most important dimension is its own


def test_targets_binning_and_dropping():
    f, specs, _ = _factors(n=200)
    f[:, 2] = np.where(np.arange(200) < 4, 1, 0)  # a class with 2 % of the images: dropped
    binned = ACFG.model_copy(update={"continuous": "bin", "bins": 4})
    targets, dropped = DI.prepare_targets(f, specs, binned)
    assert [t.name for t in targets] == ["a", "b"] and len(dropped) == 1 and dropped[0].startswith("c:")
    assert all(t.task == "classify" for t in targets)
    assert sorted(np.bincount(targets[0].y).tolist()) == [50, 50, 50, 50]  # quantile bins hold equal shares
    train, test = DI.split(200, 0.25, 3)
    assert len(test) == 50 and len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 200
