"""Metrics against hand-computed values and, where it has them, scikit-learn / scipy."""

import math
import random

import pytest

from bert.finetune import metrics


def test_accuracy_by_hand():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert metrics.accuracy(["a"], ["a"]) == 1.0
    with pytest.raises(ValueError):
        metrics.accuracy([1, 0], [1])
    with pytest.raises(ValueError):
        metrics.accuracy([], [])


def test_f1_by_hand():
    # tp=2 (idx 0, 2), fp=1 (idx 3), fn=1 (idx 1): P = R = 2/3, F1 = 2/3
    assert metrics.f1_score([1, 0, 1, 1, 0], [1, 1, 1, 0, 0]) == pytest.approx(2 / 3)
    # no positive predicted and none true: 0 (scikit-learn's zero_division=0)
    assert metrics.f1_score([0, 0], [0, 0]) == 0.0
    # macro over {0, 1}: class 1 F1 = 2/3, class 0: tp=1 fp=1 fn=1 -> 1/2
    assert metrics.f1_score([1, 0, 1, 1, 0], [1, 1, 1, 0, 0], average="macro") == pytest.approx(
        (2 / 3 + 0.5) / 2
    )


def test_mcc_by_hand():
    # tp=2 tn=1 fp=1 fn=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert metrics.matthews_corrcoef([1, 0, 1, 1, 0], [1, 1, 1, 0, 0]) == pytest.approx(1 / 6)
    assert metrics.matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_mcc_zero_division_is_zero():
    # a constant prediction (or a constant reference) leaves MCC undefined: reported as 0, not NaN
    assert metrics.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0
    assert metrics.matthews_corrcoef([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0


def test_classification_metrics_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for num_classes in (2, 3):
        for _ in range(20):
            n = rng.randint(2, 40)
            y = [rng.randrange(num_classes) for _ in range(n)]
            p = [rng.randrange(num_classes) for _ in range(n)]
            assert metrics.accuracy(p, y) == pytest.approx(sk.accuracy_score(y, p))
            assert metrics.matthews_corrcoef(p, y) == pytest.approx(sk.matthews_corrcoef(y, p), abs=1e-12)
            assert metrics.f1_score(p, y, average="macro") == pytest.approx(
                sk.f1_score(y, p, average="macro", zero_division=0)
            )
            if num_classes == 2:
                assert metrics.f1_score(p, y) == pytest.approx(sk.f1_score(y, p, zero_division=0))


def test_pearson_spearman_by_hand():
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x=[1,2,3,4], y=[1,3,2,4]: sxy = 4, sxx = syy = 5 -> 0.8
    assert metrics.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant side: undefined -> 0
    # monotone but not linear: Spearman 1, Pearson below 1
    assert metrics.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    # ties average their ranks: [1, 2.5, 2.5, 4]
    assert metrics._ranks([10, 20, 20, 30]) == [1.0, 2.5, 2.5, 4.0]


def test_pearson_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(1)
    for _ in range(20):
        n = rng.randint(3, 30)
        x = [rng.choice([0.0, 1.0, 2.5, 3.0, rng.random()]) for _ in range(n)]
        y = [rng.random() * 5 for _ in range(n)]
        if len(set(x)) < 2:
            continue
        assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
        assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)


def test_iob2_entities():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "I-ORG", "O", "I-MISC"]
    assert metrics.iob2_entities(tags) == [
        ("PER", 0, 2),
        ("LOC", 3, 4),
        ("LOC", 4, 6),
        ("ORG", 6, 7),  # I- without a matching predecessor starts an entity (conlleval)
        ("MISC", 8, 9),
    ]
    assert metrics.iob2_entities(["O", "O"]) == []
    assert metrics.iob2_entities(["B-PER", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 2)]


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-MISC"]]
    # gold: PER(0,2) LOC(3,4) ORG(0,1) = 3; pred: PER(0,1) LOC ORG MISC = 4; correct: LOC, ORG = 2
    scores = metrics.entity_scores(pred, gold)
    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert metrics.entity_scores([["O", "O"]], [["O", "O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(ValueError):
        metrics.entity_scores([["O"]], [["O", "O"]])


def test_normalize_answer():
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.normalize_answer("an apple, a pear") == "apple pear"
    assert metrics.normalize_answer("Theater") == "theater"  # 'the' only as a word


def test_squad_scores_by_hand():
    refs = {"q1": ["Denver Broncos", "the Denver Broncos"], "q2": ["Santa Clara, California"], "q3": []}
    preds = {"q1": "Broncos", "q2": "Santa Clara", "q3": ""}
    scores = metrics.squad_scores(preds, refs)
    # q1: EM 0, F1 P=1 R=1/2 -> 2/3; q2: EM 0, F1 P=1 R=2/3 -> 0.8; q3: no answer, predicted none: 1, 1
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 0.8 + 1) / 3)
    # an answer to an unanswerable question scores 0; a missing prediction scores 0
    assert metrics.squad_scores({"q3": "x"}, {"q3": []}) == {"exact_match": 0.0, "f1": 0.0}
    assert metrics.squad_scores({}, {"q1": ["a"]}) == {"exact_match": 0.0, "f1": 0.0}
    assert metrics.squad_f1("", "Denver") == 0.0
    assert metrics.squad_exact("The Denver Broncos.", "denver broncos") == 1.0
    assert math.isclose(metrics.squad_f1("x b c", "b c d"), 2 / 3)
    assert math.isclose(metrics.squad_f1("a b c", "b c d"), 0.8)  # "a" is an article: dropped
