"""Keep secrets out of logged configs: API keys come from the environment and never reach W&B, CSV logs or checkpoints.

Two rules, so a key is masked whatever it is called:

- by key name: ``api_key``, ``openai_key``, ``x-api-key``, ``secret``, ``password``, ``hf_token``,
  ``Authorization``, ``cookie``, ``credentials`` (not ``tokenizer``, ``tokens_per_s``, ``num_key_value_heads``);
- by value: any string equal to or containing the value of a secret-bearing environment variable (a name ending in
  ``API_KEY``, ``_TOKEN`` or ``_KEY``, or holding ``SECRET`` or ``PASSWORD``), e.g.
  ``+judge.extra=${oc.env:OPENAI_API_KEY}`` or ``"Bearer <key>"`` under a header name;

and, in any string, the credentials of a URL (``http://user:sk-...@host/v1`` -> ``http://***@host/v1``), whose key is
in no environment variable. ``redact_text`` applies the value rules to free text (error messages, log lines) and
``redact_hydra_files`` to the ``.hydra/*.yaml`` files Hydra writes before a job starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SECRET_KEY = re.compile(
    r"(api[_-]?key|key$|secret|password|passwd|authorization|cookie|credential|token(?!izer|s?_per|_cache|s$))",
    re.IGNORECASE,
)
SECRET_ENV = re.compile(r"(API_KEY$|_TOKEN$|_KEY$|SECRET|PASSWORD)", re.IGNORECASE)
MIN_SECRET_LENGTH = 8  # shorter environment values ("1", "true", "offline") would mask unrelated settings
REDACTED = "***"
# scheme://userinfo@ : the userinfo (user, user:password, a bare key) runs to the first "@" before any "/" or space
URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"<>]+@")
OVERRIDE = re.compile(r"(?P<key>[+~]{0,2}[A-Za-z0-9_.\-/@]+)=(?P<value>.*)", re.DOTALL)  # a command-line override


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
    if isinstance(value, str):
        return redact_url(value)
    return value


def redact_url(text: str) -> str:
    """``text`` with the credentials of every URL in it masked: ``http://u:sk-1@host/v1`` -> ``http://***@host/v1``."""
    return URL_CREDENTIALS.sub(rf"\g<scheme>{REDACTED}@", text)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """Free text (an error message, a log line) with URL credentials and secret environment values masked.

    Args:
        text: the text.
        secrets: the secret values to mask; default those of the environment (``secret_values()``).
    """
    text = redact_url(text)
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact_hydra_files(directory: str | os.PathLike | None = None, secrets: list[str] | None = None) -> list[Path]:
    """Rewrite the ``*.yaml`` files Hydra wrote for this job (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``)
    with secrets masked as in ``redact``; an override ``key=value`` is masked when ``key`` names a secret.

    Hydra writes these files before the job's function runs, so the function calls this first. Files without a
    secret are left byte for byte as they are.

    Args:
        directory: the ``.hydra`` directory; default the running job's (nothing when Hydra is not running or the
            job writes no such directory, ``hydra.output_subdir=null``).
        secrets: as in ``redact``.

    Returns:
        The files rewritten.
    """
    import yaml

    if directory is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return []
        config = HydraConfig.get()
        if config.output_subdir is None:
            return []
        directory = Path(config.runtime.output_dir) / config.output_subdir
    secrets = secret_values() if secrets is None else secrets
    rewritten = []
    for path in sorted(Path(directory).glob("*.yaml")):
        original = yaml.safe_load(path.read_text(encoding="utf-8"))
        clean = _redact_overrides(redact(original, secrets), secrets)
        if clean != original:
            path.write_text(yaml.safe_dump(clean, sort_keys=False, allow_unicode=True), encoding="utf-8")
            rewritten.append(path)
    return rewritten


def _redact_overrides(value: Any, secrets: list[str]) -> Any:
    """Command-line overrides (``a.b.api_key=sk-...`` in overrides.yaml / hydra.yaml): mask a secret key's value."""
    if isinstance(value, Mapping):
        return {k: _redact_overrides(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_overrides(v, secrets) for v in value]
    match = OVERRIDE.fullmatch(value) if isinstance(value, str) else None
    if match and SECRET_KEY.search(match["key"].split(".")[-1]) and match["value"] not in ("", "null"):
        return f"{match['key']}={REDACTED}"
    return value
