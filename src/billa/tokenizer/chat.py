"""BiLLa's dialogue format as a Hugging Face chat template, and the serving fields of ``tokenizer_config.json``.

The template renders the ids the SFT objective (``dialogue`` in the data objectives) trains on, from the same
template pieces (``billa.templates``)::

    <s>Human: {q1}\nAssistant:  {a1}</s>\nHuman: {q2}\nAssistant: ␣   (␣: the trailing space)

The objective encodes every prefix (``"Human: q\nAssistant: "``, from the second turn on with a leading "\n") and
every answer separately; with SentencePiece's dummy prefix an answer encodes as if it began with a space, so a past
answer is rendered after *two* spaces. The special tokens ``<s>``/``</s>`` split the rendered string, and the tokenizer
normalises each piece on its own (dummy prefix included), exactly as the objective's separate encodes do. The one
place where joint and separate encoding can differ is that double space: a vocabulary with whitespace-run pieces
("▁▁", as LLaMA's) may merge the two spaces before a past answer (one "▁▁" piece where training had "▁", "▁"; the
text is the same). The current turn's prompt follows ``</s>`` or ``<s>`` and has no such boundary: the generation
prompt of a single turn, and the last turn of any dialogue, are always exact (tests/test_serving_export.py).

A ``system`` message has no place in BiLLa's format; like an instruction's ``input`` field in the objective, its text
is joined to the first question with "\\n".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from billa.templates import ASSISTANT, HUMAN


def _literal(text: str) -> str:
    """``text`` as a Jinja string literal (JSON string syntax is valid Jinja)."""
    return json.dumps(text)


CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='', turns=0, last='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if ns.last -%}{{ raise_exception('BiLLa chat: a system message must come first') }}{%- endif -%}"
    "{%- set ns.system = message['content'] + " + _literal("\n") + " -%}"
    "{%- set ns.last = 'system' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if ns.last == 'user' -%}{{ raise_exception('BiLLa chat: two user messages in a row') }}{%- endif -%}"
    "{%- if ns.turns -%}{{ " + _literal("\n") + " }}{%- endif -%}"  # turns are joined with "\n"
    "{{ " + _literal(HUMAN) + " + ns.system + message['content'] + " + _literal("\n") + " }}"
    "{%- set ns.system = '' -%}{%- set ns.turns = ns.turns + 1 -%}{%- set ns.last = 'user' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if ns.last != 'user' -%}"
    "{{ raise_exception('BiLLa chat: an assistant message must follow a user message') }}"
    "{%- endif -%}"
    # one space more than the prompt: the answer was encoded on its own, with SentencePiece's dummy prefix
    "{{ " + _literal(ASSISTANT + " ") + " + message['content'] + eos_token }}"
    "{%- set ns.last = 'assistant' -%}"
    "{%- else -%}"
    "{{ raise_exception('BiLLa chat: unsupported role ' + message['role'] + ' (system, user, assistant)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if ns.last != 'user' -%}"
    "{{ raise_exception('BiLLa chat: a generation prompt needs the conversation to end with a user message') }}"
    "{%- endif -%}"
    "{{ " + _literal(ASSISTANT) + " }}"
    "{%- endif -%}"
)
"""Jinja chat template of BiLLa's dialogue format (``tokenizer_config.json`` ``chat_template``)."""


def write_serving_config(
    tokenizer_dir: str | os.PathLike, model_max_length: int | None = None, chat_template: str = CHAT_TEMPLATE
) -> dict:
    """Add the chat template, the trained context length and a padding token to ``tokenizer_config.json``.

    Args:
        tokenizer_dir: an exported tokenizer directory (modified in place).
        model_max_length: the context length trained on (``data.max_seq_length``); None leaves the field alone.
        chat_template: the Jinja template stored under ``chat_template``.

    Returns:
        The updated config.
    """
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):  # how the source was loaded, not a tokenizer setting
        config.pop(key, None)
    config["chat_template"] = chat_template
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    if not config.get("pad_token"):  # LLaMA has none; training pads with <unk> (BillaDataModule), so do servers
        config["pad_token"] = config.get("unk_token") or "<unk>"
    path.write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    return config
