"""SQuAD answer scoring on cases worked out by hand from the official evaluate-v1.1 script's
definitions (lowercase, punctuation out, articles out, whitespace collapsed; token F1 with
multiplicity; the best over the gold answers)."""

import pytest

from jaxlm.finetune import squad


@pytest.mark.parametrize("text,normal", [
    ("The Quick, Brown fox!", "quick brown fox"),
    ("  an  apple   a day ", "apple day"),
    ("theater and Anthem", "theater and anthem"),  # articles only as whole words
    ("Hello-world", "helloworld"),  # punctuation is removed, not turned into space
    ("A.B.C.", "abc"),
    ("the", ""),
    ("Zürich\tcafé", "zürich café"),
])
def test_normalisation(text, normal):
    assert squad.normalize_answer(text) == normal


@pytest.mark.parametrize("prediction,gold,em,f1", [
    ("the Eiffel Tower", "Eiffel tower.", 1.0, 1.0),
    ("the cat sat on the mat", "a cat on a mat", 0.0, 2 * 0.75 * 1.0 / 1.75),
    ("x x y", "x y y", 0.0, 2 / 3),  # tokens counted with multiplicity
    ("Oslo", "Rome", 0.0, 0.0),
    ("the", "a", 1.0, 0.0),  # both empty after normalising: equal, but no common token
    ("", "cat", 0.0, 0.0),
])
def test_exact_match_and_f1(prediction, gold, em, f1):
    assert squad.exact_match(prediction, gold) == em
    assert squad.f1(prediction, gold) == pytest.approx(f1, abs=1e-12)


def test_a_prediction_scores_the_best_over_its_gold_answers():
    assert squad.best_over_golds("Tower", ["Eiffel Tower", "the tower"]) == (1.0, 1.0)
    em, f1 = squad.best_over_golds("big red tower", ["Eiffel Tower", "red tower now"])
    assert em == 0.0 and f1 == pytest.approx(2 / 3)  # 2 common of 3 and 3: P = R = 2/3
