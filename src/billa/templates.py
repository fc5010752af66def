"""BiLLa's SFT dialogue template: the pieces both the objective and the chat template are built from.

Kept apart from ``billa.data`` and ``billa.tokenizer`` (and importing neither) so that the SFT objective, the Hugging
Face chat template and the evaluation prompts share one definition while imports flow one way:
``data/objectives.py`` and ``tokenizer/chat.py`` both import from here, and the tokenizer never imports the data.
"""

from __future__ import annotations

HUMAN, ASSISTANT = "Human: ", "Assistant: "  # the trailing space after "Assistant:" is part of the template


def dialogue_prompt(question: str) -> str:
    """The inference prompt for one question: ``"Human: {q}\\nAssistant: "``."""
    return HUMAN + question + "\n" + ASSISTANT
