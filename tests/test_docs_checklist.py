"""The GPU checklist of the README ("The real recipe on GPUs") and docs/running.md ("The real recipe on GPUs",
"Rehearsal on CPU"): every ``train.py``, ``convert.py``, ``evaluate.py`` and ``chat.py`` command of its bash blocks
composes with Hydra, as the user's shell would pass it.

Bug caught: a renamed config key or group (``init_from``, ``hardware=8xa100``, ``+experiment=rehearsal``,
``op.added_pieces``, ``task.c3.files.d``, ...) leaves the README's checklist broken: the user's job stops at a
command the docs gave, while every test that composes its own overrides still passes.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from billa.config import plan_batch

from .helpers import ROOT

# (file, heading) of every section of the checklist; a section runs to the next heading of its level or above
SECTIONS = [
    ("README.md", "### The real recipe on GPUs"),
    ("docs/running.md", "## The real recipe on GPUs"),
    ("docs/running.md", "## Rehearsal on CPU"),
]
DOORS = {"train.py": "train", "convert.py": "convert", "evaluate.py": "evaluate", "chat.py": "chat"}
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")  # <date>, <stage 1>, <partition>: a path string stands in
NEW_KEYS = {"data.streams_from"}  # being added to conf/ on main: a command naming it is skipped until it exists


@dataclass(frozen=True)
class Command:
    where: str  # file:line of the command's first line
    door: str  # train.py, convert.py, ...
    overrides: tuple[str, ...]


def section(path: str, heading: str) -> list[tuple[int, str]]:
    """(line number, line) of the section under ``heading``; lines inside code fences are never headings."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    assert start is not None, f"{path}: no section {heading!r}"
    out, fenced = [], False
    for number, line in enumerate(lines[start + 1 :], start=start + 2):
        if line.strip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        out.append((number, line))
    return out


def bash_blocks(lines: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """The ``bash`` fenced blocks of ``lines`` (indented ones inside list items too), dedented."""
    blocks, current, indent = [], None, 0
    for number, line in lines:
        stripped = line.strip()
        if current is None and stripped in ("```bash", "```sh"):
            current, indent = [], len(line) - len(line.lstrip())
        elif current is not None and stripped == "```":
            blocks.append(current)
            current = None
        elif current is not None:
            current.append((number, line[indent:]))
    return blocks


def shell_lines(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Logical shell lines: backslash continuations joined."""
    out, pending, first = [], "", 0
    for number, line in block:
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    assert not pending, f"line {first}: a continuation with nothing after it"
    return out


def door_command(where: str, line: str) -> Command | None:
    """The door and its Hydra overrides in ``line`` (``python``, ``srun python`` or ``torchrun ...`` before it)."""
    tokens = shlex.split(PLACEHOLDER.sub("/tmp/placeholder", line), comments=True)
    for i, token in enumerate(tokens):
        name = token.rsplit("/", 1)[-1]
        if name in DOORS:
            overrides, args = [], iter(tokens[i + 1 :])
            for arg in args:
                if arg in ("&&", ";", "|", "||"):
                    break
                if arg in HYDRA_FLAGS_WITH_VALUE:
                    next(args, None)  # --cfg job: the flag and its value are not overrides
                elif not arg.startswith("-"):  # -m, --multirun, --resolve
                    overrides.append(arg)
            return Command(where, name, tuple(overrides))
    return None


def checklist() -> tuple[list[Command], list[tuple[str, str]]]:
    """Every door command of the checklist, and every ``python -m <module>`` (where, module)."""
    commands, modules = [], []
    for path, heading in SECTIONS:
        for block in bash_blocks(section(path, heading)):
            for number, line in shell_lines(block):
                where = f"{path}:{number}"
                command = door_command(where, line)
                if command is not None:
                    commands.append(command)
                modules += [(where, m) for m in re.findall(r"\bpython3? -m (billa[\w.]*)", line)]
    return commands, modules


COMMANDS, MODULES = checklist()


def compose(door: str, overrides: list[str]):
    """``conf/<door>.yaml`` composed with ``overrides``, as ``python <door> <overrides>`` composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(DOORS[door], overrides=overrides)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}:{c.door}" for c in COMMANDS])
def test_checklist_command_composes(command):
    """Each command as the shell passes it (quotes removed, continuations joined, placeholders filled) composes; a
    ``train.py`` command's global batch also divides over its hardware."""
    overrides = list(command.overrides)
    new = [o for o in overrides if _key(o) in NEW_KEYS]
    if new:
        known = compose(command.door, [o for o in overrides if o not in new])
        for override in new:
            parent, _, leaf = _key(override).rpartition(".")
            node = OmegaConf.select(known, parent) if parent else known
            if not isinstance(node, DictConfig) or leaf not in node:
                pytest.skip(f"{command.where}: {_key(override)} is not in conf/ yet (being added on main)")
    cfg = compose(command.door, overrides)
    if command.door == "train.py":
        plan = plan_batch(cfg, vocab_size=46_943)  # auto hardware plans with BiLLa's vocabulary (no tokenizer here)
        assert plan.global_size == cfg.batch.global_size


def test_checklist_has_every_step_and_its_commands():
    """The extraction itself: a renamed section or a changed fence would otherwise leave nothing to compose and the
    test above pass on no commands. Steps 1 to 11 are in docs/running.md in order, each with a bash block, and the
    stage commands of steps 6 to 8 and the rehearsal are among the commands composed."""
    lines = section("docs/running.md", "## The real recipe on GPUs")
    starts = [(i, int(m.group(1))) for i, (_, line) in enumerate(lines) if (m := re.match(r"### (\d+)\. ", line))]
    assert [step for _, step in starts] == list(range(1, 12))
    for (start, step), (end, _) in zip(starts, [*starts[1:], (len(lines), 0)], strict=True):
        assert bash_blocks(lines[start:end]), f"docs/running.md step {step}: no bash block with its command"
    trained = [" ".join(c.overrides) for c in COMMANDS if c.door == "train.py"]
    for stage in ("pretrain", "task_mix", "sft"):
        assert any(f"stage={stage}" in t and "hardware=8xa100" in t and "+experiment" not in t for t in trained)
        assert any(f"stage={stage}" in t and "+experiment=rehearsal" in t for t in trained)
    assert any("hardware=2x8xa100" in t for t in trained) and any("resume=auto" in t for t in trained)
    assert {c.door for c in COMMANDS} == set(DOORS)
    assert {where.split(":")[0] for where in (c.where for c in COMMANDS)} == {"README.md", "docs/running.md"}


@pytest.mark.parametrize("where,module", MODULES, ids=[w for w, _ in MODULES])
def test_checklist_modules_exist(where, module):
    """``python -m billa.sample.rehearsal`` names a module billa has (a moved module breaks step 4 otherwise)."""
    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"


def test_checklist_lines_fit_120_characters():
    """README.md and the checklist's sections stay within the 120 characters of the rest of the repository."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    long = [f"README.md:{n}" for n, line in enumerate(readme, start=1) if len(line) > 120]
    for path, heading in SECTIONS[1:]:
        long += [f"{path}:{n}" for n, line in section(path, heading) if len(line) > 120]
    assert not long, long
