"""Keep secrets out of logged configs: API keys come from the environment and never reach W&B or CSV logs."""

from __future__ import annotations

import re
from typing import Any

SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|token(?!izer|s?_per|_cache|s$))", re.IGNORECASE)
REDACTED = "***"


def redact(value: Any) -> Any:
    """A copy of a (nested) config with the values of secret-looking keys replaced by ``***``.

    Keys such as ``api_key``, ``openai_api_key``, ``secret``, ``password``, ``hf_token`` are redacted; ``tokenizer``,
    ``tokens_per_s`` or ``token_cache_dir`` are not.
    """
    if isinstance(value, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and v is not None else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value
