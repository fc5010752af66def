"""Rationale prompt templates: ``<family>.<lang>.yaml`` files (``conf/rationale_prompts/``), chosen per record type.

A template file holds ``check`` (see ``billa.rationale.answers``), ``system`` and ``user`` messages with the
placeholders ``{input}`` and ``{answer}``, and ``answer_line``: the line the output ends with (``{answer}`` = the gold
answer). Literal braces in a template are written ``{{`` and ``}}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from billa.language import CJK, detect_lang  # noqa: F401 - re-exported: rationale code imports them from here
from billa.rationale.answers import CHECKS

DEFAULT_PROMPT_DIR = Path(__file__).resolve().parents[3] / "conf" / "rationale_prompts"
LANGS = ("zh", "en")


@dataclass(frozen=True)
class Template:
    name: str  # "<family>.<lang>"
    check: str
    system: str
    user: str
    answer_line: str

    def messages(self, input: str, answer: str) -> list[dict]:
        """The chat messages asking for a rationale of ``input`` that leads to ``answer``."""
        messages = [{"role": "user", "content": self.user.format(input=input.strip(), answer=answer)}]
        if self.system.strip():
            messages.insert(0, {"role": "system", "content": self.system.strip()})
        return messages


def load_template(path: Path) -> Template:
    """One template file, validated: every field present, ``check`` known, placeholders well formed.

    Raises:
        ValueError: naming the file and the field.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with check, system, user, answer_line")
    missing = [k for k in ("check", "user", "answer_line") if not isinstance(data.get(k), str)]
    if missing:
        raise ValueError(f"{path}: missing string field(s) {missing}")
    if data["check"] not in CHECKS:
        raise ValueError(f"{path}: check={data['check']!r}; expected one of {CHECKS}")
    for key in ("system", "user", "answer_line"):
        try:
            str(data.get(key) or "").format(input="", answer="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"{path}: field {key}: bad placeholder {err} (only {{input}} and {{answer}}; "
                "write literal braces as {{ and }})"
            ) from None
    if "{answer}" not in data["answer_line"]:
        raise ValueError(f"{path}: answer_line must contain {{answer}}")
    return Template(
        path.name.removesuffix(".yaml"), data["check"], data.get("system") or "", data["user"], data["answer_line"]
    )


class TemplateSet:
    """Record type -> template family -> ``<family>.<lang>.yaml`` in ``prompt_dir`` (each loaded once, validated).

    Args:
        prompt_dir: the directory of template files (null: ``conf/rationale_prompts`` of this repository).
        templates: record ``type`` -> family (config key ``templates``).
        default_template: the family for records without a type or with an unlisted one (null: such a record is an
            error).
        lang: ``zh``, ``en`` or ``auto`` (from the input text, ``detect_lang``).
    """

    def __init__(
        self,
        prompt_dir: str | Path | None,
        templates: dict[str, str],
        default_template: str | None = None,
        lang: str = "auto",
    ):
        if lang not in (*LANGS, "auto"):
            raise ValueError(f"lang={lang!r}: expected one of {[*LANGS, 'auto']}")
        self.dir = Path(prompt_dir) if prompt_dir else DEFAULT_PROMPT_DIR
        if not self.dir.is_dir():
            raise FileNotFoundError(f"prompt_dir={str(self.dir)!r}: no such directory of rationale templates")
        self.families = dict(templates or {})
        self.default = default_template
        self.lang = lang
        self._cache: dict[str, Template] = {}  # loaded on first use: the pre-request scan of the input meets
        # every template the run needs, so a missing or broken file stops the run before any request

    def _load(self, family: str, lang: str, key: str) -> Template:
        name = f"{family}.{lang}"
        if name not in self._cache:
            path = self.dir / f"{name}.yaml"
            if not path.is_file():
                have = sorted(p.name.removesuffix(".yaml") for p in self.dir.glob("*.yaml"))
                raise FileNotFoundError(f"{key}: no template file {path}; templates there: {have}")
            self._cache[name] = load_template(path)
        return self._cache[name]

    def family_for(self, record_type: str | None) -> str | None:
        """The family of a record type, or None when the type is unlisted and there is no default."""
        return self.families.get(record_type or "", self.default)

    def for_record(self, record_type: str | None, text: str) -> Template:
        """The template of one record (its type's family, its language)."""
        family = self.family_for(record_type)
        if family is None:
            raise KeyError(f"record type {record_type!r} has no template (add it to templates or set default_template)")
        key = f"templates.{record_type}" if record_type in self.families else "default_template"
        return self._load(family, detect_lang(text) if self.lang == "auto" else self.lang, key=key)
