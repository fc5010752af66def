"""Answer checks of the rationale tool: known-answer tables (each row is a case a real model writes)."""

from __future__ import annotations

import pytest

from billa.rationale.answers import check_answer, final_answer, gold_answer


@pytest.mark.parametrize(
    ("output", "gold"),
    [
        ("答案为25。", "25"),  # BiLLa-style labelled output
        ("25", "25"),
        ("x=(11-1)*2", "20"),  # Math23k equation: evaluated
        ("x=1/3", "1/3"),  # non-terminating fraction stays a fraction
        ("x=100/4", "25"),
        ("25%", "25%"),
        ("3.50", "3.5"),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),  # GSM8K
        ("#### 1,234", "1234"),
        ("\\frac{3}{4}", "0.75"),
        ("-5", "-5"),
        ("x=3^2+1", "10"),
        ("x=2×(3+4)÷7", "2"),
    ],
)
def test_math_gold_answers(output, gold):
    """Gold labels in the shapes the source sets use (bug: 'x=(11-1)*2' shown as 11 or rejected)."""
    assert gold_answer(output, "math") == gold


@pytest.mark.parametrize(
    ("text", "gold", "reason"),
    [
        ("先算3+2=5。\n答案为5。", "5", None),
        ("答案是 25 千米。", "25", None),  # unit after the number
        ("答案为：25%", "0.25", None),  # percent against a fraction
        ("答案为25%", "25", None),  # percent against its digits
        ("So each gets 33.33.\nTherefore, the answer is 33.33.", "100/3", None),  # rounded decimal
        ("Therefore, the answer is 100/3.", "33.33", None),  # the gold label was rounded
        ("Therefore, the answer is 0.125.", "1/8", None),
        ("Therefore, the answer is 3/4.", "0.75", None),  # fraction against decimal
        ("The answer is 1,000 apples.", "1000", None),
        ("答案为x=(11-1)*2=20。", "20", None),  # the value after the last "="
        (
            "We find 20 first; the answer is 20, not 21.\nTherefore, the answer is 21.",
            "20",
            "final answer 21 != gold 20",
        ),
        ("Therefore, the answer is 0.13.", "0.125", "final answer 0.13 != gold 0.125"),  # 0.125 is exact: no rounding
        ("Therefore, the answer is 33.", "100/3", "final answer 33 != gold 100/3"),  # integers get no tolerance
        ("It is 20.", "20", "no final answer line"),
        ("Therefore, the answer is unclear.", "20", "final answer 'unclear' has no number"),
        ("   ", "20", "empty answer"),
    ],
)
def test_math_check(text, gold, reason):
    """Numeric equality of the final answer (bug: 21 accepted for 20, or 33.33 rejected for 100/3)."""
    assert check_answer(text, gold, "math") == reason


@pytest.mark.parametrize(
    ("text", "gold", "reason"),
    [
        ("... so 12 matches option b.\nTherefore, the answer is (B).", "B", None),
        ("答案为(C)。", "C", None),
        ("Answer: D) 12", "D", None),
        ("the answer is c", "C", None),  # a bare lower-case letter alone
        ("答案为(B)。", "C", "final answer B != gold C"),
        (
            "The answer is a number bigger than 10.",
            "C",
            "final answer 'a number bigger than 10' names no option letter",
        ),
    ],
)
def test_choice_check(text, gold, reason):
    """Option letters (bug: the article 'a' read as option A)."""
    assert check_answer(text, gold, "choice") == reason


def test_choice_gold_and_span_and_none():
    assert gold_answer("c )", "choice") == "C" and gold_answer("Answer: (d)", "choice") == "D"
    with pytest.raises(ValueError, match="no option letter"):
        gold_answer("42", "choice")
    with pytest.raises(ValueError, match="no numeric gold answer"):
        gold_answer("unknown", "math")
    assert check_answer("Both are American.\nTherefore, the answer is yes.", "Yes", "span") is None
    assert check_answer("Therefore, the answer is no.", "yes", "span") == "final answer 'no' lacks gold 'yes'"
    assert check_answer("- point one\n- point two", "a summary", "none") is None
    assert final_answer("答案为5。然后……\n所以答案是6。") == "6"  # the last phrase wins
