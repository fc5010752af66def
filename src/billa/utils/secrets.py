"""Keep secrets out of logged configs: API keys come from the environment and never reach W&B, CSV logs or checkpoints.

Two rules, so a key is masked whatever it is called:

- by key name: ``api_key``, ``openai_key``, ``x-api-key``, ``secret``, ``password``, ``hf_token``,
  ``Authorization``, ``cookie``, ``credentials`` (not ``tokenizer``, ``tokens_per_s``, ``num_key_value_heads``);
- by value: any string equal to or containing the value of a secret-bearing environment variable (a name ending in
  ``API_KEY``, ``_TOKEN`` or ``_KEY``, or holding ``SECRET`` or ``PASSWORD``), e.g.
  ``+judge.extra=${oc.env:OPENAI_API_KEY}`` or ``"Bearer <key>"`` under a header name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

SECRET_KEY = re.compile(
    r"(api[_-]?key|key$|secret|password|passwd|authorization|cookie|credential|token(?!izer|s?_per|_cache|s$))",
    re.IGNORECASE,
)
SECRET_ENV = re.compile(r"(API_KEY$|_TOKEN$|_KEY$|SECRET|PASSWORD)", re.IGNORECASE)
MIN_SECRET_LENGTH = 8  # shorter environment values ("1", "true", "offline") would mask unrelated settings
REDACTED = "***"


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret-bearing environment variables (longest first), at least ``MIN_SECRET_LENGTH`` long."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if SECRET_ENV.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a (nested) config with secret-looking keys' values and secret values replaced by ``***``.

    Args:
        value: a nested structure of dicts, lists and scalars (e.g. ``OmegaConf.to_container(cfg, resolve=True)``).
        secrets: the secret values to look for; default those of the environment (``secret_values()``).
    """
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, Mapping):
        return {
            k: REDACTED if SECRET_KEY.search(str(k)) and v is not None else redact(v, secrets) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(v, secrets) for v in value)
    if isinstance(value, str) and any(secret in value for secret in secrets):
        return REDACTED
    return value
