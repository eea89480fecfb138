"""Metrics of the MRI experiment: hand-checked values and bootstrap standard errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from hsc_plugin.mri.metrics import (
    bootstrap_se,
    classification_metrics,
    confusion_matrix,
    format_table,
)


def _labels_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t, p = [], []
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            t += [i] * int(cm[i, j])
            p += [j] * int(cm[i, j])
    return np.array(t), np.array(p)


def test_confusion_and_f1_by_hand() -> None:
    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    t, p = _labels_from_confusion(cm)
    np.testing.assert_array_equal(confusion_matrix(t, p, 3), cm)
    m = classification_metrics(t, p, 3)
    # precision = tp / column sum, recall = tp / row sum
    prec = [5 / 7, 3 / 4, 4 / 5]
    rec = [5 / 6, 3 / 6, 4 / 4]
    f1 = [2 * a * b / (a + b) for a, b in zip(prec, rec)]
    assert m["accuracy"] == pytest.approx(12 / 16)
    for i in range(3):
        assert m["precision"][i] == pytest.approx(prec[i])
        assert m["recall"][i] == pytest.approx(rec[i])
        assert m["f1"][i] == pytest.approx(f1[i])
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["confusion"] == cm.tolist()
    json.dumps(m)  # JSON-safe


def test_zero_division_gives_zero() -> None:
    # class 2 never occurs and is never predicted; class 1 is never predicted
    m = classification_metrics([0, 0, 1], [0, 0, 0], 3)
    assert m["precision"][1] == 0.0 and m["recall"][1] == 0.0 and m["f1"][1] == 0.0
    assert m["f1"][2] == 0.0
    assert m["precision"][0] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0 + 0) / 3)


def test_bad_labels_raise() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 4], [0, 1], 4)
    with pytest.raises(ValueError, match="length"):
        classification_metrics([0, 1], [0], 2)


def test_bootstrap_accuracy_se_matches_binomial() -> None:
    rng = np.random.default_rng(1)
    n, p = 1281, 0.9
    t = rng.integers(0, 4, n)
    correct = rng.random(n) < p
    pred = np.where(correct, t, (t + 1) % 4)
    acc = correct.mean()
    start = time.perf_counter()
    se = bootstrap_se(t, pred, 4, n_resamples=1000, seed=0)
    elapsed = time.perf_counter() - start
    expected = np.sqrt(acc * (1 - acc) / n)
    assert se["accuracy"] == pytest.approx(expected, rel=0.1)
    assert 0 < se["macro_f1"] < 0.05
    assert set(se["f1"]) == {0, 1, 2, 3}
    assert elapsed < 2.0
    # seeded: same result twice, different seed differs
    assert bootstrap_se(t, pred, 4, n_resamples=200, seed=3) == bootstrap_se(
        t, pred, 4, n_resamples=200, seed=3
    )
    assert bootstrap_se(t, pred, 4, n_resamples=200, seed=4) != bootstrap_se(
        t, pred, 4, n_resamples=200, seed=3
    )


def test_bootstrap_perfect_predictions_have_zero_se() -> None:
    t = np.arange(100) % 4
    se = bootstrap_se(t, t, 4, n_resamples=50)
    assert se["accuracy"] == 0.0 and se["macro_f1"] == 0.0


def test_format_table_aligns() -> None:
    rows = [{"method": "svd", "acc": 0.91234, "macs": 1000}, {"method": "hsc-grid", "acc": 0.9}]
    out = format_table(rows, ["method", "acc", "macs"]).splitlines()
    assert out[0].split() == ["method", "acc", "macs"]
    assert set(out[1].replace(" ", "")) == {"-"}
    assert out[2].split() == ["svd", "0.9123", "1000"]
    assert out[3].split() == ["hsc-grid", "0.9"]
    # numbers right-aligned: the accuracy column ends at the same offset in every data row
    end = out[2].index("0.9123") + len("0.9123")
    assert out[3].index("0.9") + len("0.9") == end
