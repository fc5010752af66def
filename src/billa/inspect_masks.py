"""The mask inspector: ``python train.py stage=sft inspect=4`` prints samples of a stage's training stream with the
loss-bearing tokens marked, then exits — a look at what the model will learn before any GPU hour is spent.

Text that carries loss is shown between ``⟦`` and ``⟧`` (and in green on a terminal); everything else (prompts, the
part before a conditional-generation cut, Human turns) carries none. Special tokens are shown as the tokenizer
spells them (``<s>``, ``</s>``).
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.text import Text

from billa.data.objectives import IGNORE
from billa.tokenizer.load import load_tokenizer
from billa.utils.logging import setup_logging

OPEN, CLOSE = "⟦", "⟧"


def segments(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """(text, carries loss) runs of a sample, decoded by prefix so multi-byte characters and spaces stay exact."""
    runs, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            runs.append((start, i, labels[start] != IGNORE))
            start = i
    decoded = [tokenizer.decode(input_ids[:end], skip_special_tokens=False) for _, end, _ in runs]
    out, previous = [], ""
    for (_, _, loss), text in zip(runs, decoded, strict=True):
        out.append((text[len(previous) :] if text.startswith(previous) else text, loss))
        previous = text
    return out


def render(tokenizer, sample: dict) -> Text:
    """A sample as rich Text: loss-bearing runs between ⟦ ⟧ and green."""
    text = Text()
    for chunk, loss in segments(tokenizer, [int(i) for i in sample["input_ids"]], [int(i) for i in sample["labels"]]):
        text.append(f"{OPEN}{chunk}{CLOSE}" if loss else chunk, style="bold green" if loss else "dim")
    return text


def inspect_stage(cfg: DictConfig, console: Console | None = None) -> dict:
    """Build the stage's data exactly as training would and print the first ``cfg.inspect`` samples of its stream.

    Returns:
        ``{"samples": [{"source", "tokens", "loss_tokens", "segments"}]}`` for the printed samples.
    """
    from billa.train import stage_datamodule

    setup_logging()
    console = console or Console(soft_wrap=True)
    tokenizer_dir = instantiate(cfg.model.tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir)
    datamodule = stage_datamodule(cfg, tokenizer_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    count = min(int(cfg.inspect), len(datamodule.train_set))
    try:
        return _print_samples(cfg, console, tokenizer, datamodule, count)
    finally:
        datamodule.teardown()  # the stream sources' feeder


def _print_samples(cfg, console, tokenizer, datamodule, count: int) -> dict:
    samples = []
    console.print(f"stage={cfg.stage_name}: the first {count} samples of the training stream; loss on {OPEN}...{CLOSE}")
    for index in range(count):
        sample = datamodule.train_set[index]
        loss_tokens = sum(int(label) != IGNORE for label in sample["labels"])
        tokens = len(sample["input_ids"])
        header = f"--- sample {index} | source {sample['source']} | {tokens} tokens, {loss_tokens} with loss"
        console.print(header, style="bold")
        console.print(render(tokenizer, sample))
        parts = segments(tokenizer, [int(i) for i in sample["input_ids"]], [int(i) for i in sample["labels"]])
        samples.append(
            {
                "source": sample["source"],
                "tokens": len(sample["input_ids"]),
                "loss_tokens": loss_tokens,
                "segments": parts,
            }
        )
    return {"samples": samples}
