"""Which language a text is in: what rationale templates and task prompt lines are chosen by."""

from __future__ import annotations

import re

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def detect_lang(text: str) -> str:
    """``zh`` when at least 10% of the non-space characters are CJK ideographs, else ``en``."""
    chars = [ch for ch in text if not ch.isspace()]
    if not chars:
        return "en"
    return "zh" if sum(bool(CJK.match(ch)) for ch in chars) >= 0.1 * len(chars) else "en"
