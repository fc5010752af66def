"""Stage-2 rationale generation: task records -> an OpenAI-compatible chat model -> checked rationale records.

For every task record ``{"id", "input", "output", "type"}`` the model is asked, with the template of the record's
type and language, for a step-by-step explanation that leads to the known answer (``output``). Where the answer is
checkable (math, choice, span) the explanation must end in it, else it is asked again (``answer_attempts`` answers
in all) and finally written to the rejected file with the reasons. Accepted records keep the task format, with
``output`` = rationale + the template's answer line, so the output file is a stage-2 task source as it stands.

Resume: the output and rejected files are appended one whole line per record, keyed by ``id``; a rerun skips every
id already in either, and the response cache (``billa.openai_client``) holds every answer received, so a killed run
neither pays twice nor writes a record twice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from billa.openai_client import ChatClient, ChatFailed, ChatResult, ContentRejected, UnparsableResponse
from billa.rationale.answers import answer_start, check_answer, gold_answer
from billa.rationale.prompts import CJK, Template, TemplateSet
from billa.utils.jsonl import JsonlAppender, read_jsonl
from billa.utils.logging import setup_logging
from billa.utils.secrets import redact_hydra_files

log = logging.getLogger(__name__)


class RationaleError(RuntimeError):
    """The run cannot go on (bad input file, fatal API error); the message names the file, line or config key."""


@dataclass
class Task:
    id: str
    input: str
    output: str
    type: str | None
    where: str  # file:line
    template: Template
    gold: str | None  # None when the gold answer could not be read (gold_error says why)
    gold_error: str | None = None


@dataclass(frozen=True)
class Paths:
    output: Path
    rejected: Path
    responses: Path

    @staticmethod
    def from_config(cfg: DictConfig) -> Paths:
        for key in ("input", "output"):
            if OmegaConf.is_missing(cfg, key) or not cfg.get(key):
                raise RationaleError(f"`{key}` is required: python rationale.py input=<tasks.jsonl> output=<out.jsonl>")
        output = Path(cfg.output)
        if output.suffix != ".jsonl":
            raise RationaleError(f"output={cfg.output!r}: expected a .jsonl file (records are appended line by line)")
        stem = output.with_suffix("")
        rejected = Path(cfg.rejected) if cfg.get("rejected") else Path(f"{stem}.rejected.jsonl")
        responses = Path(cfg.responses) if cfg.get("responses") else Path(f"{stem}.responses.jsonl")
        if len({output.resolve(), rejected.resolve(), responses.resolve()}) < 3:
            raise RationaleError("output, rejected and responses must be three different files")
        return Paths(output, rejected, responses)


def estimate_tokens(text: str) -> int:
    """A rough token count for budgeting (no tokenizer download): ~1.5 tokens per CJK character, 4 chars per token
    otherwise (GPT-3.5/4 tokenizers land within about 30% of this on Chinese and English prose)."""
    cjk = len(CJK.findall(text))
    return math.ceil(1.5 * cjk + (len(text) - cjk) / 4)


def _messages_tokens(messages: list[dict]) -> int:
    return sum(4 + estimate_tokens(m["content"]) for m in messages) + 3  # ~4 tokens of framing per message


# -- reading tasks ----------------------------------------------------------------------------------------------------


def _raw_tasks(pattern: str, on_error: str, log_skips: bool = True) -> Iterator[tuple[str, dict]]:
    """``(file:line, raw record)`` of every task record; the ``id`` is kept (billa's task reader drops it)."""
    from billa.data.readers import DataFormatError, _raw_records, expand_paths

    for path in expand_paths(pattern, "input"):
        for line, raw in _raw_records(path):
            where = f"{path}:{line}"
            problem = None
            if isinstance(raw, DataFormatError):
                problem = str(raw)
            elif not isinstance(raw, dict):
                problem = f"{where}: expected a JSON object {{id, input, output, type}}, got {type(raw).__name__}"
            elif not isinstance(raw.get("input"), str) or not isinstance(raw.get("output"), str):
                problem = f"{where}: task record lacks string field(s) input/output; has {sorted(raw)}"
            if problem is None:
                raw = {**raw, "id": str(raw["id"]) if raw.get("id") is not None else f"{Path(path).name}:{line}"}
                yield where, raw
            elif on_error == "raise":
                raise RationaleError(f"{problem} (set on_error=skip to skip such records, counted)")
            else:
                if log_skips:
                    log.warning("skipped: %s", problem)
                yield where, {}


def _task(where: str, raw: dict, templates: TemplateSet) -> Task:
    try:
        template = templates.for_record(raw.get("type"), raw["input"])
    except (KeyError, FileNotFoundError, ValueError) as err:  # no template for the type, or a missing/broken file
        raise RationaleError(f"{where}: {err.args[0]}") from None
    try:
        gold, error = gold_answer(raw["output"], template.check), None
    except ValueError as err:
        gold, error = None, str(err)
    return Task(raw["id"], raw["input"], raw["output"], raw.get("type"), where, template, gold, error)


def _finished_ids(paths: Paths) -> set[str]:
    """Ids already in the output or rejected file (a bad line there stops the run: it would hide a finished id)."""
    try:
        return {str(o["id"]) for path in (paths.output, paths.rejected) for _, o in read_jsonl(path) if "id" in o}
    except ValueError as err:
        raise RationaleError(f"{err} (fix or remove that line; nothing was sent)") from None


@dataclass
class Scan:
    records: int = 0
    skipped: int = 0  # malformed, on_error=skip
    finished: int = 0  # already in the output or rejected file
    pending: int = 0
    prompt_tokens: int = 0  # estimated, pending records
    gold_unreadable: int = 0  # pending records whose gold answer cannot be read: rejected without a request


def scan(cfg: DictConfig, templates: TemplateSet, finished: set[str]) -> Scan:
    """Read the whole input once before any request: formats, templates, duplicate ids, counts, token estimate.

    Raises:
        RationaleError: naming file and line of the first bad record or duplicated id.
    """
    stats, seen = Scan(), {}
    for where, raw in _raw_tasks(cfg.input, cfg.on_error):
        if not raw:
            stats.skipped += 1
            continue
        stats.records += 1
        if raw["id"] in seen:
            raise RationaleError(f"{where}: id {raw['id']!r} already used at {seen[raw['id']]} (ids key the resume)")
        seen[raw["id"]] = where
        task = _task(where, raw, templates)
        if raw["id"] in finished:
            stats.finished += 1
        elif cfg.limit is None or stats.pending < cfg.limit:
            stats.pending += 1
            stats.gold_unreadable += task.gold is None
            stats.prompt_tokens += _messages_tokens(task.template.messages(task.input, task.gold or task.output))
    return stats


def pending_tasks(cfg: DictConfig, templates: TemplateSet, finished: set[str]) -> Iterator[Task]:
    count = 0
    for where, raw in _raw_tasks(cfg.input, cfg.on_error, log_skips=False):  # scan() logged them
        if not raw or raw["id"] in finished:
            continue
        if cfg.limit is not None and count >= cfg.limit:
            return
        count += 1
        yield _task(where, raw, templates)


# -- one record -------------------------------------------------------------------------------------------------------


def compose_output(text: str, task: Task) -> str:
    """Rationale + the template's answer line with the gold answer.

    A checked rationale's own final-answer line is replaced by the canonical one, so every output ends the same way
    ("答案为25。", "Therefore, the answer is (C)."); for unchecked types the answer line is appended.

    Raises:
        UnparsableResponse: when no rationale is left before the answer.
    """
    body = text if task.template.check == "none" else text[: answer_start(text)]
    body = body.strip()
    if not body:
        raise UnparsableResponse("no rationale before the final answer")
    return body + "\n" + task.template.answer_line.format(answer=task.gold)


def generate_one(client: ChatClient, task: Task, attempts: int) -> ChatResult:
    """Ask for ``task``'s rationale until one passes the answer check (``attempts`` answers at most).

    Raises:
        ContentRejected: every answer failed the check (or the gold answer is unreadable: no request is sent).
        ChatFailed: the API gave no answer (see ``ChatClient.chat``).
    """
    if task.gold is None:
        raise ContentRejected([f"gold answer unreadable: {task.gold_error}"], "")

    def parse(text: str) -> str:
        reason = check_answer(text, task.gold, task.template.check)
        if reason is not None:
            raise UnparsableResponse(reason)
        return compose_output(text, task)

    return client.chat(task.template.messages(task.input, task.gold), parse=parse, attempts=attempts)


# -- the run ----------------------------------------------------------------------------------------------------------


def _dry_run(cfg: DictConfig, templates: TemplateSet, finished: set[str], stats: Scan) -> dict:
    from rich.console import Console

    console = Console(soft_wrap=True, highlight=False)
    for number, task in enumerate(pending_tasks(cfg, templates, finished)):
        if number >= cfg.dry_run_records:
            break
        messages = task.template.messages(task.input, task.gold or task.output)
        console.print(f"=== {task.where} id={task.id} type={task.type} template={task.template.name}", markup=False)
        for message in messages:
            console.print(f"[{message['role']}]\n{message['content']}", markup=False)
        console.print(f"(gold {task.gold!r}; ~{_messages_tokens(messages)} prompt tokens)", markup=False)
    max_tokens = OmegaConf.select(cfg, "client.params.max_tokens")
    completion = stats.pending * max_tokens if max_tokens else None
    summary = {
        "dry_run": True,
        "records": stats.records,
        "finished": stats.finished,
        "pending": stats.pending,
        "gold_unreadable": stats.gold_unreadable,
        "estimated_prompt_tokens": stats.prompt_tokens,
        "max_completion_tokens": completion,
    }
    console.print(
        f"=== estimate: {stats.pending} of {stats.records} records to do ({stats.finished} finished): "
        f"~{stats.prompt_tokens:,} prompt tokens per attempt"
        + (f", at most {completion:,} completion tokens" if completion else ""),
        markup=False,
    )
    return summary


def _progress(cfg: DictConfig, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rationales", unit="rec", disable=not cfg.progress, dynamic_ncols=True)


def run(cfg: DictConfig) -> dict:
    """Generate rationales for ``cfg.input`` into ``cfg.output`` (see conf/rationale.yaml); returns the counts."""
    setup_logging()  # also keeps httpx's one INFO line per request out of rationale.log
    redact_hydra_files()  # a key in client.base_url (http://user:key@host) must not stay in .hydra/*.yaml
    if cfg.answer_attempts < 1:
        raise RationaleError(f"answer_attempts={cfg.answer_attempts}: expected an integer >= 1")
    if cfg.on_error not in ("raise", "skip"):
        raise RationaleError(f"on_error={cfg.on_error!r}: expected raise or skip")
    paths = Paths.from_config(cfg)
    try:
        templates = TemplateSet(cfg.prompt_dir, OmegaConf.to_container(cfg.templates), cfg.default_template, cfg.lang)
    except (ValueError, FileNotFoundError) as err:
        raise RationaleError(str(err)) from None
    finished = _finished_ids(paths)
    stats = scan(cfg, templates, finished)
    log.info("%s: %d records, %d already finished, %d to do", cfg.input, stats.records, stats.finished, stats.pending)
    if stats.gold_unreadable:
        log.warning(
            "%d of the %d records to do have an unreadable gold answer for their template's check: they will be "
            "rejected without a request (dry_run=true shows them as gold None)",
            stats.gold_unreadable,
            stats.pending,
        )
    if cfg.dry_run:
        return _dry_run(cfg, templates, finished, stats)

    try:
        client: ChatClient = instantiate(cfg.client, cache_path=str(paths.responses))
    except InstantiationException as err:  # a bad client.* value: its message names the key
        raise RationaleError(str(err)) from None
    counts = {"done": 0, "rejected": 0, "failed": 0}
    try:
        if stats.pending:
            client.preflight()  # key and endpoint, before any record
        with (
            JsonlAppender(paths.output) as out,
            JsonlAppender(paths.rejected) as rejected,
            _progress(cfg, stats.pending) as bar,
        ):
            work = pending_tasks(cfg, templates, finished)
            for task, result in client.map_unordered(lambda t: generate_one(client, t, cfg.answer_attempts), work):
                _record(task, result, out, rejected, counts)
                bar.update(1)
                usage = client.usage
                bar.set_postfix({**counts, "tokens": usage.total_tokens, "cached": usage.cached}, refresh=False)
    except KeyboardInterrupt:
        log.warning("interrupted after %s; rerun the same command to continue where it stopped", counts)
        raise
    finally:
        client.close()
    summary = {**counts, "finished_before": stats.finished, "skipped": stats.skipped, **client.usage.as_dict()}
    summary.update(output=str(paths.output), rejected_file=str(paths.rejected))
    log.info("rationales: %s", summary)
    if summary["malformed"]:
        log.warning(
            "%d answers arrived with a malformed body (cut, undecodable or not a completion) and were asked again",
            summary["malformed"],
        )
    if counts["failed"]:
        log.warning("%d records got no answer from the API; rerun the same command to retry them", counts["failed"])
    return summary


def _record(task: Task, result: object, out: JsonlAppender, rejected: JsonlAppender, counts: dict) -> None:
    """Write one finished task where it belongs (the main thread only: no two writers per file)."""
    if isinstance(result, ChatResult):
        out.write({"id": task.id, "input": task.input, "output": result.value, "type": task.type})
        counts["done"] += 1
    elif isinstance(result, ContentRejected):
        rejected.write(
            {
                "id": task.id,
                "type": task.type,
                "where": task.where,
                "template": task.template.name,
                "gold": task.gold,
                "reason": result.reasons[-1] if result.reasons else "",
                "reasons": result.reasons,
                "last_answer": result.last_text,
            }
        )
        counts["rejected"] += 1
    elif isinstance(result, ChatFailed):
        counts["failed"] += 1
        log.warning("%s id=%s: %s", task.where, task.id, result)
        if result.fatal:
            raise RationaleError(f"stopping: {result} (every further request would fail the same way)")
    elif isinstance(result, BaseException):
        raise result
    else:  # pragma: no cover - map_unordered yields results or exceptions only
        raise TypeError(f"unexpected result {result!r}")
