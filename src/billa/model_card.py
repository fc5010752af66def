"""The model card (``README.md``) of an exported stage: Hub YAML metadata + what was trained, on what, and how.

Everything the card states comes in as explicit values (``ModelCard``), gathered by ``billa.train.export`` from the
run: the stage, the data mix actually realised, the schedule, the hardware, the final validation figures and the
command that reproduces the run. ``render_model_card`` only formats.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

STAGES = {  # stage_name -> what the stage is, in the recipe's terms
    "pretrain": "stage 1 of 3: bilingual continued pretraining (Chinese + English text and translation)",
    "task_mix": "stage 2 of 3: language-model data mixed 1:1 with rationale-bearing task data",
    "sft": "stage 3 of 3: supervised fine-tuning on Human/Assistant dialogues",
}


@dataclass
class ModelCard:
    """What the card says. Mappings render as tables in their insertion order.

    Attributes:
        model_name: the model config's name (``model.name``).
        stage: the stage name (``stage_name``).
        mix: source -> ``{"weight": configured weight, "samples": ..., "tokens": ..., "share": realised share}``.
        schedule: label -> value (steps, batch, lr, warmup, sequence length, optimizer, precision).
        hardware: label -> value (accelerator, devices, strategy, device name).
        metrics: metric name -> final value (``val/loss``, ``val/ppl``, ``train/loss``, the step-0 baseline).
        command: the command line that reproduces the run (None when unknown, e.g. composed in-process).
        init_from: where the weights started (a previous stage's export, pretrained weights or random init).
        data: source/split -> records and examples (the data report).
        license: Hub license id (``other`` with ``license_name`` for LLaMA-derived weights).
        license_name: the Hub ``license_name`` when ``license`` is ``other``.
        base_model: Hub id of the model this one was trained from; None leaves the field out.
        datasets: Hub dataset ids trained on.
        tags: Hub tags.
        language: ISO codes of the languages.
        notes: extra lines for the body (e.g. how the mix counts are taken).
    """

    model_name: str
    stage: str
    mix: Mapping[str, Mapping[str, float]]
    schedule: Mapping[str, object]
    hardware: Mapping[str, object]
    metrics: Mapping[str, float]
    command: str | None = None
    init_from: str | None = None
    data: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    license: str = "other"
    license_name: str | None = "llama-license"
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    language: list[str] = field(default_factory=lambda: ["zh", "en"])
    notes: list[str] = field(default_factory=list)


def _yaml_value(value) -> str:
    """A YAML scalar; JSON strings are valid YAML and quote whatever needs quoting."""
    return json.dumps(value, ensure_ascii=False)


def front_matter(card: ModelCard) -> str:
    """The Hub metadata block (between ``---`` lines)."""
    lines = ["---", "language:", *(f"- {code}" for code in card.language), f"license: {card.license}"]
    if card.license == "other" and card.license_name:
        lines.append(f"license_name: {card.license_name}")
    if card.base_model:
        lines.append(f"base_model: {_yaml_value(card.base_model)}")
    if card.datasets:
        lines += ["datasets:", *(f"- {_yaml_value(d)}" for d in card.datasets)]
    tags = list(dict.fromkeys(["billa", "llama", "bilingual", f"stage:{card.stage}", *card.tags]))
    lines += ["tags:", *(f"- {_yaml_value(t)}" for t in tags)]
    lines += ["library_name: transformers", "pipeline_tag: text-generation", "---"]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return lines


def _mix_table(mix: Mapping[str, Mapping[str, float]]) -> list[str]:
    rows = []
    for source, counts in mix.items():
        share = counts.get("share")
        rows.append(
            [
                f"`{source}`",
                counts.get("weight", "-"),
                counts.get("samples", "-"),
                f"{100 * share:.1f}%" if share is not None else "-",
                counts.get("tokens", "-"),
            ]
        )
    return _table(["source", "weight", "samples", "realised share", "tokens"], rows)


def render_model_card(card: ModelCard) -> str:
    """The full ``README.md`` text."""
    stage_text = STAGES.get(card.stage, card.stage)
    out = [front_matter(card), "", f"# {card.model_name}: BiLLa {card.stage}", ""]
    out += [
        "A bilingual Chinese-English LLaMA trained by billa, a reproduction of the "
        f"[BiLLa](https://github.com/Neutralzz/BiLLa) recipe: **{stage_text}** (`stage={card.stage}`).",
        "",
        f"Initialised from: {card.init_from or 'random initialisation'}.",
        "",
    ]
    if card.stage != "sft":
        out += [
            "This checkpoint was not trained on dialogues. Its chat template is BiLLa's dialogue format "
            "(`Human: {question}\\nAssistant: `), which stage 3 trains on; prompt it as a completion model.",
            "",
        ]
    out += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    out += [
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
        'messages = [{"role": "user", "content": "用一句话介绍你自己。"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')",
        "output = model.generate(**inputs)  # sampling defaults from generation_config.json",
        "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "The prompt is `Human: {question}\\nAssistant: ` (with the space after `Assistant:`); turns are joined "
        'with "\\n" and every answer ends with `</s>`. Chat servers that read `tokenizer_config.json` '
        "(vLLM, TGI, transformers) apply it as is.",
        "",
    ]
    out += ["## Training data (realised mix)", "", *_mix_table(card.mix), ""]
    out += [*card.notes, ""] if card.notes else []
    if card.data:
        rows = [[f"`{split}`", n.get("records", "-"), n.get("examples", "-")] for split, n in card.data.items()]
        out += ["Data report (records read, examples kept):", ""]
        out += _table(["source/split", "records", "examples"], rows)
        out.append("")
    out += ["## Schedule", "", *_table(["setting", "value"], [[k, v] for k, v in card.schedule.items()]), ""]
    out += ["## Hardware", "", *_table(["setting", "value"], [[k, v] for k, v in card.hardware.items()]), ""]
    out += ["## Final validation", ""]
    if card.metrics:
        out += _table(["metric", "value"], [[f"`{k}`", v] for k, v in card.metrics.items()])
    else:
        out.append("No validation ran.")
    out += ["", "## Reproduce", ""]
    if card.command:
        out += ["```bash", card.command, "```"]
    else:
        out.append("The run was composed in-process; no command line was recorded.")
    out += [
        "",
        "The fully resolved configuration is in the run's `.hydra/config.yaml`.",
        "",
    ]
    return "\n".join(out)


def realised_mix(weights: Mapping[str, float], metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Per source: configured weight, and the samples, tokens and share counted by ``train/samples|tokens/<source>``.

    Args:
        weights: ``data.mix`` (source -> weight).
        metrics: the trainer's last logged metrics (``Throughput`` logs the per-source counts summed over ranks).
    """
    mix = {}
    for source, weight in weights.items():
        mix[source] = {"weight": weight}
        for what in ("samples", "tokens"):
            value = metrics.get(f"train/{what}/{source}")
            if value is not None:
                mix[source][what] = int(value)
    total = sum(counts.get("samples", 0) for counts in mix.values())
    for counts in mix.values():
        if total and "samples" in counts:
            counts["share"] = counts["samples"] / total
    return mix


def hub_datasets(sources: Mapping[str, Mapping]) -> list[str]:
    """Hub dataset ids of the sources read from ``hf://<id>[:config][@split]``."""
    ids = []
    for spec in sources.values():
        for split in ("train", "val"):
            path = str((spec or {}).get(split) or "")
            if path.startswith("hf://"):
                ids.append(path[len("hf://") :].partition("@")[0].partition(":")[0])
    return list(dict.fromkeys(ids))


def hydra_command() -> str | None:
    """``python <entry point>.py <overrides>`` of the running Hydra job (None outside one, e.g. composed in a test).

    Only the job's own overrides: ``hydra.*`` ones (the run directory, the launcher) are left out, so the command
    reproduces the run into a fresh directory. Values of secret-looking keys (``*api_key``, ``*token``) become ``***``.
    """
    import shlex

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    from billa.utils.secrets import REDACTED, SECRET_KEY

    hydra_cfg = HydraConfig.get()
    overrides = []
    for override in hydra_cfg.overrides.task:
        key, sep, _ = override.partition("=")
        overrides.append(shlex.quote(f"{key}={REDACTED}" if sep and SECRET_KEY.search(key) else override))
    return " ".join(["python", f"{hydra_cfg.job.name}.py", *overrides])


def hydra_choice(group: str) -> str | None:
    """The config file chosen for ``group`` (e.g. ``hardware`` -> ``8xa100``) in the running Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def hardware_file(choice: str | None = None) -> str:
    """``conf/hardware/<choice>.yaml`` of the running Hydra job (``choice`` given: that one), for messages."""
    choice = choice or hydra_choice("hardware")
    return f"conf/hardware/{choice}.yaml" if choice else "the hardware config (hardware=...)"
