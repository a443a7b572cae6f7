"""Metric functions against hand-computed values; CI code on known distributions."""

import numpy as np
import pytest

from tunewise.metrics import METRICS, normalize_label, score
from tunewise.eval.stats import bootstrap_ci, paired_test, percentile


def test_accuracy_normalises_labels():
    assert normalize_label("  Card_Arrival.\nextra line") == "card_arrival"
    assert normalize_label("card arrival") == "card_arrival"
    assert score("accuracy", ["Card_Arrival.", "card arrival", "card_linking"], ["card_arrival"] * 3) == [1.0, 1.0, 0.0]
    assert score("exact_match", ["a ", "A"], ["a", "a"]) == [1.0, 0.0]


def test_token_f1_hand_computed():
    # pred -> "cat sat", ref -> "cat sat down": P=1, R=2/3, F1=0.8
    assert score("token_f1", ["The cat sat!"], ["a cat sat down"]) == [pytest.approx(0.8)]
    assert score("token_f1", ["dog"], ["cat"]) == [0.0]
    assert score("token_f1", ["", "x"], ["", ""]) == [1.0, 0.0]


def test_rouge_l_hand_computed():
    # LCS("a b c d", "a c d e") = "a c d" = 3 -> F = 2*3/(4+4)
    assert score("rouge_l", ["a b c d"], ["a c d e"]) == [pytest.approx(0.75)]
    assert score("rouge_l", ["x y"], ["z"]) == [0.0]


def test_chrf_and_bleu_bounds():
    same = "the quick brown fox jumps over the lazy dog"
    assert score("chrf", [same], [same])[0] == pytest.approx(1.0)
    assert score("bleu", [same], [same])[0] == pytest.approx(1.0)
    assert score("bleu", ["zzz qqq"], [same])[0] < 0.05
    assert 0 < score("chrf", ["the quick brown cat"], [same])[0] < 1


def test_registry_rejects_unknown_metric():
    assert {"accuracy", "exact_match", "token_f1", "rouge_l", "chrf", "bleu"} <= set(METRICS)
    with pytest.raises(KeyError, match="unknown metric"):
        score("nope", [], [])


def test_bootstrap_ci_width_and_centre():
    x = np.random.default_rng(1).binomial(1, 0.7, size=2000)
    e = bootstrap_ci(x)
    assert e.low < 0.7 < e.high
    # normal-approximation width 2*1.96*sqrt(p(1-p)/n) = 0.0402
    assert (e.high - e.low) == pytest.approx(0.0402, rel=0.15)
    assert bootstrap_ci([1, 1, 1]).as_dict() == {"mean": 1.0, "ci95": [1.0, 1.0], "n": 3}


def test_bootstrap_ci_coverage_is_near_95_percent():
    rng = np.random.default_rng(2)
    hits = 0
    for i in range(300):
        e = bootstrap_ci(rng.binomial(1, 0.3, size=200), n_boot=500, seed=i)
        hits += e.low <= 0.3 <= e.high
    assert 0.90 <= hits / 300 <= 0.99


def test_paired_test_detects_real_differences_only():
    rng = np.random.default_rng(3)
    a = rng.binomial(1, 0.5, size=300).astype(float)
    better = np.where(rng.random(300) < 0.2, 1.0, a)  # 20% of items flipped to correct
    assert paired_test(a, better).p_value < 0.01
    assert paired_test(a, better).diff.mean > 0
    assert paired_test(a, a).p_value == 1.0
    noise = np.where(rng.random(300) < 0.1, 1 - a, a)  # symmetric noise: no real difference
    assert paired_test(a, noise).p_value > 0.05
    with pytest.raises(ValueError, match="same items"):
        paired_test([1, 0], [1])


def test_percentile():
    assert percentile([1, 2, 3, 4], 50) == 2.5
