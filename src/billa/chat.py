"""``python chat.py``: answer prompts with any exported HF model through BiLLa's dialogue template.

Questions come from ``questions`` (a list), ``questions_file`` (one per line, or jsonl with ``text``/``question``),
or, on a terminal with neither, an interactive session (``multi_turn=true`` keeps the conversation). The model sees
exactly what the SFT objective trained on: BOS + ``"Human: {q}\\nAssistant: "`` (earlier turns as
``a</s>\\nHuman: ...``), and generation stops at EOS. Greedy by default; ``do_sample=true`` samples with
``temperature`` / ``top_p``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from billa.config import ConfigError
from billa.data.readers import DataFormatError
from billa.distributed.safe_load import pretrained_loading
from billa.templates import dialogue_prompt
from billa.utils.errors import MissingInputError
from billa.utils.logging import get_logger, setup_logging

log = get_logger(__name__)


def latest_export(root: str | Path = "outputs") -> str:
    """The newest HF export under ``root`` (``<root>/**/hf/config.json``), for commands run after ``train.py``."""
    exports = sorted(Path(root).glob("**/hf/config.json"), key=lambda p: p.stat().st_mtime)
    if not exports:
        raise MissingInputError(
            f"model_path: no exported model under {Path(root).absolute()}/**/hf; run `python train.py` first or set "
            "model_path=<HF model directory>"
        )
    return str(exports[-1].parent)


def prompt_ids(tokenizer, question: str, history: list[tuple[str, str]] = ()) -> list[int]:
    """Token ids of a dialogue prompt, built exactly as ``billa.data.objectives.dialogue`` builds its prefixes."""
    ids = [tokenizer.bos_token_id]
    for i, (asked, answered) in enumerate(history):
        ids += tokenizer.encode(("\n" if i else "") + dialogue_prompt(asked), add_special_tokens=False)
        ids += tokenizer.encode(answered, add_special_tokens=False) + [tokenizer.eos_token_id]
    ids += tokenizer.encode(("\n" if history else "") + dialogue_prompt(question), add_special_tokens=False)
    return ids


class Chat:
    """A loaded model + tokenizer that answers questions through the dialogue template."""

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu", **generation):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with pretrained_loading(model_path, "model_path"):  # billa's message for untrusted .bin weights, not torch's
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model = self.model.to(device).eval()
        self.device = device
        self.generation = {k: v for k, v in generation.items() if v is not None}
        if not self.generation.get("do_sample"):
            self.generation = {k: v for k, v in self.generation.items() if k not in ("temperature", "top_p")}

    @torch.no_grad()
    def answer(self, question: str, history: list[tuple[str, str]] = ()) -> str:
        ids = torch.tensor([prompt_ids(self.tokenizer, question, history)], device=self.device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
            **self.generation,
        )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _read_prompts(path: str) -> list[str]:
    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"questions_file={path}:{number}: not valid JSON ({err.msg})") from None
            text = record.get("text") or record.get("question") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataFormatError(
                    f"questions_file={path}:{number}: expected a jsonl record with a string 'text' or 'question'"
                )
            prompts.append(text)
        else:
            prompts.append(line)
    return prompts


def run(cfg: DictConfig) -> list[dict]:
    """Answer every configured prompt (or chat interactively); returns ``[{"question", "answer"}]``."""
    from rich.console import Console

    setup_logging()
    console = Console(soft_wrap=True)
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`device`={cfg.device}, but this machine has no CUDA device: set device=cpu")
    model_path = cfg.model_path or latest_export(cfg.outputs_dir)
    log.info("chat: %s", model_path)
    chat = Chat(model_path, cfg.dtype, cfg.device, **dict(cfg.generation))
    prompts = list(cfg.questions or []) + (_read_prompts(cfg.questions_file) if cfg.questions_file else [])
    interactive = not prompts and sys.stdin.isatty()
    history: list[tuple[str, str]] = []
    results = []
    while True:
        if interactive:
            question = console.input("[bold]Human:[/bold] ").strip()
            if question in ("", "exit", "quit"):
                break
        elif prompts:
            question = prompts.pop(0)
        else:
            break
        answer = chat.answer(question, history if cfg.multi_turn else ())
        if cfg.multi_turn:
            history.append((question, answer))
        results.append({"question": question, "answer": answer})
        if not interactive:
            console.print(f"[bold]Human:[/bold] {question}")
        console.print(f"[bold]Assistant:[/bold] {answer}")
    if cfg.get("output"):
        with open(cfg.output, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    return results
