"""One error path for every entry point: an error billa raises on purpose is a message, not a stack trace.

A mistake the user can fix (a config value, a malformed data file, an untrusted checkpoint, a missing file named by a
config key) ends the process with one block on stderr and exit status 2, as a bad Hydra group choice does::

    billa: error: data.sources.en.train: /data/en.jsonl:7: not valid JSON (Expecting ',' delimiter)
    (stack trace in outputs/pretrain/2026-12-04_11-20-00/train.log; HYDRA_FULL_ERROR=1 prints it here)

The stack trace goes to the run's log file (Hydra's ``<run dir>/<job>.log``) and never to the terminal; with
``HYDRA_FULL_ERROR=1`` the exception propagates and Hydra prints it. Any other exception is a bug and propagates
unchanged (Hydra prints it, exit status 1); its stack trace is written to the log file too.

What counts as billa's own error (``user_error_in``): a ``BillaError`` (``ConfigError``, ``DataFormatError``,
``UntrustedCheckpointError`` derive from it), one of the types an entry point adds (``also``), or a built-in
``ValueError`` / ``OSError`` / ``KeyError`` whose message starts with a config key (``CONFIG_KEY_MESSAGE``: what the
data layer raises for "no usable examples" and missing files, checkpoints for a missing ``ckpt_path``, evaluation for
a missing model). Wrappers are looked through: ``hydra.utils.instantiate`` raises its own exception ``from`` the
target's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

# Messages of plain built-in exceptions that billa raises on purpose start with the config key they are about:
# a dotted key (``data.sources.en.val: ...``, ``report.runs: ...``) or a key and its value (``ckpt_path=...``,
# ```resume`='always'``). Library messages do not start that way; ``model_path`` also starts a sentence.
CONFIG_KEY_MESSAGE = re.compile(r"`?(?:[a-z_]\w*(?:\.\w+)+|[a-z_]\w*`?=)")
CONFIG_KEY_PREFIXES = ("model_path ",)
_KEYED_TYPES = (ValueError, OSError, KeyError)
_MAX_WRAPPERS = 8  # how many ``raise ... from`` links to follow before giving up


class BillaError(Exception):
    """An error billa raises on purpose: its message names the file and line or the config key, and the fix."""


class ConfigError(BillaError, ValueError):
    """A configuration value is missing or inconsistent; the message names the key(s) and what is expected."""


class MissingInputError(BillaError, FileNotFoundError):
    """A file or directory a config key names does not exist (or holds nothing usable); the message names the key."""


class EmptyDataError(BillaError, ValueError):
    """A data source yields no usable examples; the message names the source's config key and its files."""


def user_error_in(err: BaseException | None, also: tuple[type[BaseException], ...] = ()) -> BaseException | None:
    """``err`` itself or the error it wraps (through ``raise ... from``) when that is one billa raised on purpose.

    Args:
        err: the exception that reached the entry point.
        also: further types the entry point treats as the user's mistake (e.g. the OpenAI client's key errors).

    Returns:
        The first exception of the ``__cause__`` chain that is a ``BillaError``, an instance of ``also``, or a
        built-in error whose message starts with a ``data.`` config key; None when there is none (a bug).
    """
    for _ in range(_MAX_WRAPPERS):
        if err is None:
            return None
        if isinstance(err, (BillaError, *also)) or _is_keyed(err):
            return err
        err = err.__cause__
    return None


def _is_keyed(err: BaseException) -> bool:
    """A built-in error whose message starts with a config key (``data.sources.en.val: no usable examples ...``)."""
    if not isinstance(err, _KEYED_TYPES) or not err.args or not isinstance(err.args[0], str):
        return False
    message = err.args[0]
    return bool(CONFIG_KEY_MESSAGE.match(message)) or message.startswith(CONFIG_KEY_PREFIXES)


def error_message(err: BaseException) -> str:
    """The text of ``err`` as a user reads it (a ``KeyError``'s own ``str`` would quote it)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


def format_error(err: BaseException, log_files: list[str] = ()) -> str:
    """The block printed for ``err``: ``billa: error: <message>`` and where its stack trace is."""
    body = textwrap.indent(error_message(err), "  ").lstrip()
    where = f"stack trace in {', '.join(log_files)}; " if log_files else ""
    return f"billa: error: {body}\n({where}HYDRA_FULL_ERROR=1 prints it here)\n"


def _file_handlers() -> list[logging.FileHandler]:
    """The root logger's handlers that write to a file (Hydra's job log ``<run dir>/<job>.log``), not the terminal."""
    handlers = logging.getLogger().handlers
    return [h for h in handlers if isinstance(h, logging.FileHandler) and h.baseFilename != os.devnull]


def log_files() -> list[str]:
    """The files the root logger writes to, relative to the working directory when inside it."""
    names = []
    for handler in _file_handlers():
        path = Path(handler.baseFilename)
        with contextlib.suppress(ValueError):
            path = path.relative_to(Path.cwd())
        names.append(str(path))
    return names


def log_traceback(err: BaseException, message: str) -> None:
    """Write ``message`` and the stack trace of ``err`` to the root logger's files only (never to the terminal)."""
    record = logging.LogRecord("billa", logging.ERROR, __file__, 0, message, None, (type(err), err, err.__traceback__))
    for handler in _file_handlers():
        handler.handle(record)


@contextlib.contextmanager
def exit_on_error(also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn an error billa raised on purpose into one ``billa: error:`` block on stderr and exit status 2.

    Every exception's stack trace is written to the run's log file. With ``HYDRA_FULL_ERROR=1`` the exception
    propagates (Hydra prints its stack trace); exceptions that are not billa's (``user_error_in``) always do.

    Args:
        also: further exception types the entry point treats as the user's mistake.

    Raises:
        SystemExit: status 2, after the block is written.
    """
    try:
        yield
    except Exception as err:
        cause = user_error_in(err, also)
        if cause is None:
            log_traceback(err, f"{type(err).__name__}: {err}")
            raise
        log_traceback(err, f"billa: error: {error_message(cause)}")
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stderr.write(format_error(cause, log_files()))
        sys.stderr.flush()
        raise SystemExit(2) from None
