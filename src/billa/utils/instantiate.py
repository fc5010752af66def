"""Objects from config: a ``_target_`` partial completed with the run-time values its target asks for by name."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any


def accepted(fn: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that ``fn`` takes as parameters (all of them when it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(values)
    return {name: value for name, value in values.items() if name in params}


def complete(node: Any, runtime: Mapping[str, Any], **config: Any) -> Any:
    """Instantiate the partial ``node`` (``_target_`` + ``_partial_: true``) and call it with run-time values.

    Args:
        node: a config node whose keys are parameters of its ``_target_``.
        runtime: values that exist only at run time (tokenizer, batch plan, sample counts); each is passed when the
            target has a parameter of that name, so a new option is one YAML key and one parameter, nothing between.
        **config: values that replace the node's own keys (e.g. a different ``mix`` for evaluation).
    """
    from hydra.utils import instantiate

    fn = instantiate(node, _convert_="all", **config)
    return fn(**accepted(fn, runtime))
