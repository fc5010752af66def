"""Gold answers and answer checks: does a rationale end in the task's known answer?

Checks (a template's ``check``):
    math:   the rationale's final "答案为X" / "the answer is X" is numerically equal to the gold answer. Numbers may
            be integers, decimals, fractions (``3/4``, ``\\frac{3}{4}``), percentages (``25%`` = 0.25, also accepted
            against a gold 25) or thousands-separated (``1,000``); a gold equation such as Math23k's ``x=(11-1)*2``
            is evaluated. A rounded decimal matches when it equals the gold value rounded to as many decimals
            (``33.33`` for ``100/3``; a gold value with a finite decimal, such as 0.125, must be met exactly).
    choice: the final answer is an option letter A-E (``(C)`` or ``C``) equal to the gold letter.
    span:   the normalised gold text (lower case, no punctuation or articles) occurs in the final answer.
    none:   nothing to check (summaries, code): the rationale must only be non-empty.
"""

from __future__ import annotations

import ast
import operator
import re
import string
from dataclasses import dataclass
from fractions import Fraction

CHECKS = ("math", "choice", "span", "none")

# The final-answer phrase a template asks for; the LAST match in a text is its final answer.
ANSWER_PHRASE = re.compile(
    r"(?:答案(?:应该|应)?(?:(?:为|是)[：:]?|[：:])|(?<![解回])答[：:]|(?:the\s+)?(?:final\s+)?answer\s*(?:is|=|:)\s*:?)"
    r"[ \t]*(?P<answer>[^\n]*)",
    re.IGNORECASE,
)
NUMBER = re.compile(
    r"(?P<sign>[-+−])?\s*(?:\\frac\{(?P<fn>\d+)\}\{(?P<fd>\d+)\}|(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?)\s*(?P<pct>%|％)?"
)
LETTER_MODEL = re.compile(r"\(\s*([A-Ea-e])\s*\)|(?<![A-Za-z])([A-E])(?![A-Za-z])")
LETTER_GOLD = re.compile(r"(?<![A-Za-z])([A-Ea-e])(?![A-Za-z])")
TRAILING = " \t.。．!！,，;；:：$*"


@dataclass(frozen=True)
class Number:
    value: Fraction
    decimals: int  # digits after the decimal point as written (rounding tolerance)
    percent: bool


def final_answer(text: str) -> str | None:
    """The text after the last final-answer phrase ("答案为", "the answer is"), trailing punctuation stripped."""
    matches = list(ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    return matches[-1].group("answer").strip().rstrip(TRAILING).strip()


def _number(match: re.Match) -> Number:
    sign = -1 if match.group("sign") in ("-", "−") else 1
    if match.group("fn"):
        value, decimals = Fraction(int(match.group("fn")), int(match.group("fd")) or 1), 0
    else:
        num = match.group("num").replace(",", "")
        value = Fraction(num)
        decimals = len(num.split(".")[1]) if "." in num else 0
        if match.group("den"):
            den = Fraction(match.group("den"))
            value, decimals = (value / den if den else value), 0
    return Number(sign * value, decimals, bool(match.group("pct")))


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, power = _evaluate(node.left), _evaluate(node.right)
        if power.denominator != 1 or abs(power) > 64:
            raise ValueError("unsupported power")
        return base ** int(power)
    raise ValueError(f"unsupported expression node {type(node).__name__}")


def _expression(text: str) -> Number | None:
    """An arithmetic expression (Math23k's ``(11-1)*2``, ``3^2``, ``25%``) evaluated exactly, or None."""
    expr = text.replace("×", "*").replace("÷", "/").replace("^", "**").replace("（", "(").replace("）", ")")
    expr = re.sub(r"(\d+(?:\.\d+)?)\s*%", r"(\1/100)", expr)
    if not re.fullmatch(r"[\d\s.+\-*/()]+", expr) or not re.search(r"\d", expr):
        return None
    try:
        value = _evaluate(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None
    return Number(value, 0, False)  # a computed value: exact, no rounding tolerance


def parse_number(text: str) -> Number | None:
    """The answer number in ``text``: after the last ``=`` when there is one; an expression is evaluated."""
    text = text.split("####")[-1]  # GSM8K-style "... #### 72"
    text = text.split("=")[-1].strip().rstrip(TRAILING)
    if (whole := NUMBER.fullmatch(text)) is not None:
        return _number(whole)
    if (value := _expression(text)) is not None:
        return value
    match = NUMBER.search(text)
    return _number(match) if match else None


def _terminates(value: Fraction) -> bool:
    """True when ``value`` has a finite decimal expansion (denominator 2^a 5^b)."""
    return all(p in (2, 5) for p in _prime_factors(value.denominator))


def _rounds_to(exact: Fraction, shown: Fraction, decimals: int) -> bool:
    return decimals > 0 and abs(exact - shown) <= Fraction(1, 2 * 10**decimals)


def numbers_equal(candidate: Number, gold: Number) -> bool:
    """Equal exactly; or the candidate is the gold value rounded to the decimals it shows, where the gold value has
    no finite decimal (33.33 for 100/3, but not 0.13 for 0.125); or the gold is itself a rounded decimal that the
    candidate rounds to. A percent may match its fraction (25% = 0.25) or its digits (25% = 25)."""

    def values(n: Number) -> list[Fraction]:
        return [n.value / 100, n.value] if n.percent else [n.value]

    for a in values(candidate):
        for b in values(gold):
            if a == b:
                return True
            if not _terminates(b) and _rounds_to(b, a, candidate.decimals):
                return True
            if _rounds_to(a, b, gold.decimals):
                return True
    return False


def format_number(n: Number) -> str:
    """How the gold answer is shown in a prompt and in the output's answer line."""
    value = n.value
    if value.denominator == 1:
        text = str(value.numerator)
    elif _terminates(value):
        text = f"{float(value):.10f}".rstrip("0").rstrip(".")
    else:
        text = f"{value.numerator}/{value.denominator}"
    return text + ("%" if n.percent else "")


def _prime_factors(n: int) -> set[int]:
    factors, p = set(), 2
    while p * p <= n:
        while n % p == 0:
            factors.add(p)
            n //= p
        p += 1
    if n > 1:
        factors.add(n)
    return factors


def _normalise(text: str) -> str:
    text = text.lower()
    text = "".join(" " if ch in string.punctuation or ch in "，。！？、；：“”‘’（）《》" else ch for ch in text)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def gold_answer(output: str, check: str) -> str:
    """The gold answer of a task record's ``output``, as shown in the prompt.

    Raises:
        ValueError: when a ``math`` or ``choice`` gold answer cannot be read (the record cannot be checked).
    """
    if check not in CHECKS:
        raise ValueError(f"unknown answer check {check!r}; expected one of {CHECKS}")
    text = final_answer(output) or output.strip()
    if check == "math":
        number = parse_number(text)
        if number is None:
            raise ValueError(f"no numeric gold answer in output {output[:80]!r}")
        return format_number(number)
    if check == "choice":
        match = LETTER_GOLD.search(text)
        if match is None:
            raise ValueError(f"no option letter A-E in gold output {output[:80]!r}")
        return match.group(1).upper()
    return output.strip()


def check_answer(text: str, gold: str, check: str) -> str | None:
    """Why ``text`` fails the check against ``gold`` (from ``gold_answer``), or None when it passes."""
    if not text.strip():
        return "empty answer"
    if check == "none":
        return None
    answer = final_answer(text)
    if answer is None:
        return "no final answer line"
    if check == "math":
        number = parse_number(answer)
        if number is None:
            return f"final answer {answer[:40]!r} has no number"
        gold_number = parse_number(gold)
        if gold_number is None or not numbers_equal(number, gold_number):
            return f"final answer {format_number(number)} != gold {gold}"
        return None
    if check == "choice":
        match = LETTER_MODEL.search(answer) or re.fullmatch(r"\(?([a-e])\)?", answer)
        if match is None:
            return f"final answer {answer[:40]!r} names no option letter"
        letter = next(g for g in match.groups() if g).upper()
        return None if letter == gold else f"final answer {letter} != gold {gold}"
    if check == "span":
        return None if _normalise(gold) in _normalise(answer) else f"final answer {answer[:60]!r} lacks gold {gold!r}"
    raise ValueError(f"unknown answer check {check!r}; expected one of {CHECKS}")


def answer_start(text: str) -> int:
    """Where the last final-answer phrase starts in ``text`` (``len(text)`` when there is none)."""
    matches = list(ANSWER_PHRASE.finditer(text))
    if not matches:
        return len(text)
    start = matches[-1].start()
    # include a leading "Therefore," / "所以" on the same line
    line_start = text.rfind("\n", 0, start) + 1
    prefix = text[line_start:start]
    return line_start if len(prefix) <= 24 else start
