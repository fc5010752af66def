"""Bad input as an adversarial user would bring it: one fixture file per case in tests/fixtures/bad_input/.

Each case must stop with an error naming the file and line (``data.on_error=raise``), or, under ``skip``, keep every
readable record and count the rest — never a bare library exception, never silent loss.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from billa.data.readers import DataFormatError, ReadStats, read_records

FIXTURES = Path(__file__).parent / "fixtures" / "bad_input"

# file, reader format and options, the error it must raise (after "file:"), records kept and skipped under skip
READER_CASES = [
    ("malformed.jsonl", "pile", {}, r"2: not valid JSON", 2, 1),
    ("missing_field.jsonl", "pile", {}, r"2: PILE record lacks string field\(s\) \['text'\]", 1, 1),
    ("non_utf8.jsonl", "pile", {}, r"2: not valid UTF-8 \(byte 13 of the line", 2, 1),
    (
        "non_utf8.json",
        "wudao",
        {},
        r"2: array element 2 is not valid UTF-8 \(first bad byte at offset 179, line 2\)",
        2,
        1,
    ),
    ("non_utf8.jsonl.zst", "pile", {}, r"2: not valid UTF-8", 2, 1),
    ("gzip_renamed.jsonl.zst", "pile", {}, r"1: corrupt zstd stream \(.*\): it is a gzip file, not zstd", 0, 1),
    (
        "truncated.jsonl.zst",
        "pile",
        {},
        r"1688: corrupt zstd stream \(Truncated compressed stream\); 1687 lines",
        1687,
        1,
    ),
    (
        "alpaca_input_not_string.json",
        "instruction",
        {},
        r"2: .* field 'input' must be a string \(or absent\), got list",
        2,
        1,
    ),
    ("dolly_context_not_string.jsonl", "instruction", {}, r"2: Dolly .* field 'context' must be a string", 1, 1),
    (
        "pile_meta_not_object.jsonl",
        "pile",
        {"pile_sets": ["Pile-CC"]},
        r"2: PILE record field 'meta' must be an object",
        1,
        1,
    ),
    (
        "task_type_not_string.jsonl",
        "task",
        {},
        r"2: task .* field 'type' must be a string \(or absent\), got int 7",
        1,
        1,
    ),
]


@pytest.mark.parametrize("name,fmt,options,message,kept,skipped", READER_CASES, ids=[c[0] for c in READER_CASES])
def test_bad_file_names_file_and_line_and_skip_counts_it(name, fmt, options, message, kept, skipped):
    """Bugs caught: a bare UnicodeDecodeError / OSError without a path (non-UTF-8 bytes, a gzip file named .zst,
    a truncated stream); ``skip`` not skipping them; records before the damage thrown away; a list ``input``, a dict
    ``context``, a string ``meta`` or an int ``type`` passing the reader and crashing later inside a worker."""
    path = FIXTURES / name
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:") + message):
        list(read_records(path, fmt, "data.sources.en.train", **options))
    stats = ReadStats()
    records = list(read_records(path, fmt, "data.sources.en.train", stats, on_error="skip", **options))
    assert (len(records), stats.read, stats.skipped) == (kept, kept, skipped)
    assert stats.skipped_examples[0].startswith(f"{path}:")
    for record in records:  # what reaches the objectives is plain strings (type may be None)
        assert all(isinstance(v, str) or (k == "type" and v is None) for k, v in record.fields.items()), record


# file, format, records kept, records left out for empty text (under raise and skip alike), the first reason
EMPTY_CASES = [
    ("empty_text.jsonl", "pile", 1, 2, "2: empty text"),
    ("empty_translation.jsonl", "translation", 1, 2, "2: empty en"),
    ("empty_output.jsonl", "instruction", 2, 2, "2: empty output"),  # and line 3: no instruction nor input
]


@pytest.mark.parametrize("name,fmt,kept,empty,reason", EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
def test_empty_texts_are_left_out_and_counted(name, fmt, kept, empty, reason):
    """Bug caught: ``{"text": ""}``, an empty side of a pair or an empty output silently becoming a training
    example (BOS + EOS only, or a prompt with nothing to learn)."""
    path = FIXTURES / name
    for on_error in ("raise", "skip"):
        stats = ReadStats()
        records = list(read_records(path, fmt, "data.sources.x.train", stats, on_error=on_error))
        assert (len(records), stats.read, stats.empty, stats.skipped) == (kept, kept, empty, 0)
        assert stats.skipped_examples[0] == f"{path}:{reason}"


def test_tokenisation_pass_reports_skipped_and_empty_records(tmp_path, sample_tokenizer_dir, caplog):
    """Bug caught: counts lost between the reader and the data report (a worker's stats not carried to the end)."""
    from billa.data.cache import ObjectiveSettings, tokenize_source
    from billa.data.datamodule import DEFAULT_PROMPTS_DIR
    from billa.train import report_data

    data = tmp_path / "data"
    data.mkdir()
    for name in ("empty_text.jsonl", "non_utf8.jsonl", "malformed.jsonl"):
        (data / name).write_bytes((FIXTURES / name).read_bytes())
    settings = ObjectiveSettings("en", "pile", "causal_lm", 64, 0, False, on_error="skip")
    dataset, stats = tokenize_source(
        str(data / "*.jsonl"), settings, sample_tokenizer_dir, str(DEFAULT_PROMPTS_DIR), tmp_path / "c"
    )
    assert len(dataset) == stats["examples"] == 1 + 2 + 2
    assert (stats["empty_text"], stats["skipped_malformed"], stats["files"]) == (2, 2, 3)
    with caplog.at_level("INFO", logger="billa"):
        report_data({"en/train": stats})
    assert "'skipped_malformed': 2" in caplog.text and "'empty_text': 2" in caplog.text


class _RunsCode:
    """Unpickling this calls ``os.system`` (the shape of a crafted checkpoint); saving it runs nothing."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def crafted_checkpoint(tmp_path) -> tuple[Path, Path]:
    """A billa-looking ZeRO-3 checkpoint directory whose optimizer shard runs a command when unpickled."""
    import torch

    ckpt = tmp_path / "run" / "checkpoints" / "step=000004.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("")
    marker = tmp_path / "code-ran"
    client = {"hyper_parameters": {"model": {"architecture": {}}, "vocab_size": 8, "tokenizer_dir": str(tmp_path)}}
    torch.save(client, ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    optim = {"optimizer_state_dict": {"zero_stage": 3, "partition_count": 1, "hook": _RunsCode(marker)}}
    torch.save(optim, ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return ckpt, marker


def test_crafted_zero_checkpoint_is_refused_by_convert(crafted_checkpoint, tmp_path):
    """Bug caught: DeepSpeed's consolidation unpickling every shard with weights_only=False (code execution)."""
    from billa.convert.zero_to_hf import zero_to_hf
    from billa.distributed.safe_load import UntrustedCheckpointError

    ckpt, marker = crafted_checkpoint
    with pytest.raises(UntrustedCheckpointError) as err:
        zero_to_hf(ckpt, tmp_path / "hf")
    message = str(err.value)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in message and "posix.system" in message
    assert "op.trust_checkpoint=true" in message
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_forced_weights_only_loading_stops_library_loads(crafted_checkpoint):
    """Bug caught: a library call site passing weights_only=False inside billa's loading context (DeepSpeed's
    parse_optim_states does) still unpickling arbitrary callables."""
    import pickle

    import torch

    from billa.distributed.safe_load import weights_only_loading

    ckpt, marker = crafted_checkpoint
    shard = ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with weights_only_loading(), pytest.raises(pickle.UnpicklingError, match="posix.system"):
        torch.load(shard, weights_only=False)  # what DeepSpeed's zero_to_fp32 calls
    assert not marker.exists()


def test_deepspeed_types_of_real_zero_shards_are_allowed(tmp_path):
    """Bug caught: an allow-list missing what ZeRO optimizer shards pickle (loss scaler, ZeRO stage enum), which
    would make every genuine checkpoint unloadable."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from billa.distributed.safe_load import check_checkpoint, weights_only_loading

    shard = tmp_path / "ckpt" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.parent.mkdir()
    state = {
        "zero_stage": ZeroStageEnum.weights,
        "loss_scaler": LossScaler(1.0),
        "dyn": DynamicLossScaler(2.0**16, 1000, 1.0, 2, False),
    }
    torch.save({"optimizer_state_dict": {**state, "fp32_flat_groups": [torch.ones(4)]}}, shard)
    check_checkpoint(shard.parent, "ckpt_path")  # no error
    with weights_only_loading():
        loaded = torch.load(shard, weights_only=False)["optimizer_state_dict"]
    assert loaded["zero_stage"] == ZeroStageEnum.weights and loaded["loss_scaler"].cur_scale == 1.0
    with pytest.raises(Exception, match="Unsupported global"):  # the allow-list is what makes it load
        torch.load(shard, weights_only=True)


def test_resume_from_a_crafted_checkpoint_is_refused_before_any_work(crafted_checkpoint, compose, tmp_path):
    """Bug caught: resuming from someone else's checkpoint directory runs its pickles in DeepSpeed's engine."""
    from billa.distributed.safe_load import UntrustedCheckpointError
    from billa.train import run

    ckpt, marker = crafted_checkpoint
    cfg = compose([f"ckpt_path='{ckpt.parent}'", "logger=none"], output_dir=tmp_path / "out")
    with pytest.raises(UntrustedCheckpointError, match=r"ckpt_path=.*posix\.system.*trust_checkpoint=true"):
        run(cfg)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("init_from=/nonexistent/stage1/hf", r"`init_from`=/nonexistent/stage1/hf: no such directory"),
        ("init_from={fixtures}", r"`init_from`=.*: not a HF model directory \(no config.json\)"),
        ("model.pretrained_path=/nonexistent/llama", r"`model.pretrained_path`=/nonexistent/llama: no such directory"),
        ("data.on_error=ignore", r"`data.on_error`='ignore': expected raise .* or skip"),
        ("resume=always", r"`resume`='always': expected auto"),
    ],
)
def test_config_mistakes_stop_before_any_work(compose, override, message):
    """Bugs caught: a missing init_from surfacing after the whole tokenisation pass as "Repo id must be in the
    form ...", data.on_error=ignore failing only at tokenisation and without its key, an unknown resume value."""
    from billa.config import ConfigError, validate

    cfg = compose([override.format(fixtures=FIXTURES)])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_resume_auto_says_where_it_looked(compose, tmp_path, caplog):
    """Bug caught: resume=auto with no checkpoint (a new timestamped run directory) silently starting fresh."""
    from billa.train import resume_checkpoint

    cfg = compose(["resume=auto"], output_dir=tmp_path)
    with caplog.at_level("INFO", logger="billa"):
        assert resume_checkpoint(cfg) is None
    assert f"resume=auto: no complete checkpoint in {tmp_path / 'checkpoints'}, starting from scratch" in caplog.text
    assert "hydra.run.dir" in caplog.text


def test_stale_temp_directories_of_dead_passes_are_removed(tmp_path):
    """Bug caught: killed or failed passes leaving <hash>.tmp<PID> directories in the cache forever (19 MB after one
    kill), or a cleanup that deletes the directory of a pass still running."""
    import socket
    import subprocess
    import sys

    from billa.data.cache import remove_stale_temp

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        shard_root = tmp_path / "cache" / "en" / "settingskey"
        host = socket.gethostname()
        names = {
            "dead": f"abc.tmp-{host}-{dead_pid}",
            "legacy": f"def.tmp{dead_pid}",
            "live": f"ghi.tmp-{host}-{live.pid}",
            "other_host": f"jkl.tmp-elsewhere-{dead_pid}",  # may belong to a pass running on another node
        }
        for name in names.values():
            (shard_root / name).mkdir(parents=True)
            (shard_root / name / "data.arrow").write_bytes(b"x" * 1000)
        (tmp_path / "cache" / f"file_hashes.json.tmp-{host}-{dead_pid}").write_text("{}")
        assert remove_stale_temp(tmp_path / "cache") == 3
        left = {p.name for p in shard_root.iterdir()}
        assert left == {names["live"], names["other_host"]}
        assert not list((tmp_path / "cache").glob("file_hashes.json.tmp*"))
    finally:
        live.kill()
        live.wait()


def test_an_in_place_edit_keeping_size_and_mtime_gets_a_new_shard(tmp_path, sample_tokenizer_dir):
    """Bug caught: the file-hash index trusting (path, size, mtime), so an edit that keeps both reuses a stale
    shard although shards are keyed by content."""
    import os

    from billa.data.cache import ObjectiveSettings, tokenize_source
    from billa.data.datamodule import DEFAULT_PROMPTS_DIR

    path = tmp_path / "en.jsonl"
    path.write_text('{"text": "the first version"}\n')
    stat = path.stat()
    settings = ObjectiveSettings("en", "pile", "causal_lm", 64, 0, False)
    args = (str(path), settings, sample_tokenizer_dir, str(DEFAULT_PROMPTS_DIR), tmp_path / "cache")
    first, _ = tokenize_source(*args)
    path.write_text('{"text": "the other version"}\n')  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    second, stats = tokenize_source(*args)
    assert stats["reused_shards"] == 0
    assert list(second[0]["input_ids"]) != list(first[0]["input_ids"])


# ---- byte-order marks -------------------------------------------------------------------------------------------
BOM_CASES = [
    ("bom.jsonl", "pile", "text", "first record after a byte-order mark"),
    ("bom.jsonl.zst", "pile", "text", "first record after a byte-order mark"),
    ("bom.json", "wudao", "text", "第一条\n\n字节顺序标记之后的第一条记录"),
]


@pytest.mark.parametrize("name,fmt,key,first", BOM_CASES, ids=[c[0] for c in BOM_CASES])
def test_a_byte_order_mark_does_not_break_the_first_record(name, fmt, key, first):
    """Bug caught: a file saved by a Windows editor (UTF-8 with BOM) losing its first record, or stopping the run
    with "not valid JSON (Unexpected UTF-8 BOM)", on both the reader path (read_piece) and the stream path
    (stream.file_pieces + parse_records), which share the line and array parsers."""
    from billa.data.readers import parse_records
    from billa.data.stream import file_pieces

    path = FIXTURES / name
    assert path.read_bytes().startswith(b"\xef\xbb\xbf") or name.endswith(".zst")
    stats = ReadStats()
    records = list(read_records(path, fmt, "data.sources.x.train", stats))  # on_error=raise: nothing may fail
    assert [r.line for r in records] == [1, 2] and records[0].fields[key] == first
    streamed = [
        record
        for _, _, _, items in file_pieces(str(path))
        for record in parse_records(items, str(path), fmt, ReadStats())
    ]
    assert [r.fields for r in streamed] == [r.fields for r in records]


# ---- paths: dangling links, lists ---------------------------------------------------------------------------------
def test_a_dangling_symlink_is_named_with_its_config_key(tmp_path):
    """Bug caught: a shard whose link target was moved surfacing later as a bare ``os.stat`` FileNotFoundError
    without the config key (through a glob), or silently left out (through a directory)."""
    from billa.data.readers import expand_paths

    (tmp_path / "00.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "01.jsonl").symlink_to(tmp_path / "moved" / "01.jsonl")
    for pattern in (tmp_path / "*.jsonl", tmp_path):
        with pytest.raises(FileNotFoundError) as err:
            expand_paths(pattern, "data.sources.en.train")
        message = str(err.value)
        assert (
            message.startswith("data.sources.en.train: ") and f"{tmp_path / '01.jsonl'} is a symbolic link" in message
        )
        assert str(tmp_path / "moved" / "01.jsonl") in message


def test_a_list_of_paths_and_globs_names_each_file_once(tmp_path):
    """Bugs caught: a list of paths for one source read as one glob ("no file matches ['a', 'a']"), a file named
    twice read twice, a Hydra ListConfig not taken as a list, and a mistyped path in a list silently left out."""
    from omegaconf import OmegaConf

    from billa.data.readers import expand_paths

    for name in ("a.jsonl", "b.jsonl", "c.jsonl.zst"):
        (tmp_path / name).write_text("")
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert expand_paths([a, a], "k") == [a]
    assert expand_paths(OmegaConf.create([b, a, str(tmp_path / "*.jsonl")]), "k") == [a, b]
    assert expand_paths((str(tmp_path / "*.zst"), str(tmp_path / "*.parquet")), "k") == [str(tmp_path / "c.jsonl.zst")]
    with pytest.raises(FileNotFoundError, match=re.escape(f"data.sources.en.train[1]: no file matches '{a}x'")):
        expand_paths([a, a + "x"], "data.sources.en.train")
    with pytest.raises(FileNotFoundError, match=r"data.sources.en.train: no file matches any of \["):
        expand_paths([str(tmp_path / "*.txt"), str(tmp_path / "*.parquet")], "data.sources.en.train")


# ---- a source named twice in data.mix --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,key",
    [
        (["data.mix.zh=3", "data.mix.zh=5"], "data.mix.zh"),
        (["data.mix={zh: 1, en: 1, zh: 2}"], "data.mix.zh"),
        (["data.mix.en=1", "data.mix={zh: 4, en: 4}"], "data.mix.en"),
        (["data={mix: {translate: 1, translate: 2}}"], "data.mix.translate"),
        (["data.mix.zh=1", "++data.mix.zh=7"], "data.mix.zh"),
        (["data.mix.zh=1", "~data.mix.zh", "+data.mix.zh=2"], None),  # removed, then set again: once each
        (["data.mix={zh: 1, en: 1}", "data.mix.translate=3", "stage=task_mix"], None),
    ],
)
def test_a_source_named_twice_in_data_mix_is_refused(overrides, key):
    """Bug caught: ``data.mix.zh=3 ... data.mix.zh=5`` (a launcher script appending to the user's overrides) or a
    dict with a repeated key silently training on the last weight. Hydra composes these without complaint (one value
    per key), so only the overrides show it."""
    from billa.config import ConfigError, check_mix_overrides

    if key is None:
        check_mix_overrides(overrides)
        return
    with pytest.raises(ConfigError, match=re.escape(f"`{key}` is set 2 times on the command line")):
        check_mix_overrides(overrides)


def test_validate_reads_the_overrides_of_the_hydra_run():
    """Bug caught: the duplicate check written but never consulted in a real run (``validate`` reading no overrides),
    although Hydra hands the command line's overrides, duplicates included, to the app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from billa.config import ConfigError, validate

    from .helpers import ROOT

    overrides = ["data.mix.zh=3", "data.mix.zh=5"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.data.mix.zh == 5  # composed without complaint: the last value won
    saved = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().set_config(cfg)  # as @hydra.main does
        with pytest.raises(ConfigError, match=r"`data.mix.zh` is set 2 times .*data.mix.zh=3 data.mix.zh=5"):
            validate(cfg)
    finally:
        HydraConfig.instance().cfg = saved


# ---- records longer than training can use ------------------------------------------------------------------------
def test_a_huge_record_is_cut_before_tokenising_and_counted(tmp_path):
    """Bug caught: a 30 MB single-line record handed whole to the tokenizer (37 s, 4.1 GB), on either read path, or
    cut without a count (the data report cannot say it happened), or short records cut too."""
    import json

    from billa.data.readers import Piece, parse_records, read_piece, record_char_bound
    from billa.data.stream import file_pieces

    bound = record_char_bound(64)
    assert bound == 64 * 16 * 2
    huge = "the quick brown fox " * 50_000  # 1 MB on one line
    path = tmp_path / "huge.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("short", huge, "also short")))
    stats = ReadStats()
    records = list(read_piece(Piece(str(path), 0, "file"), "pile", stats, max_chars=bound))
    assert [r.fields["text"] for r in records[::2]] == ["short", "also short"]
    assert huge.startswith(records[1].fields["text"]) and len(records[1].fields["text"]) == bound
    assert (stats.read, stats.cut_long) == (3, 1)
    streamed_stats = ReadStats()
    streamed = [
        r
        for _, _, _, items in file_pieces(str(path))
        for r in parse_records(items, str(path), "pile", streamed_stats, max_chars=bound)
    ]
    assert [r.fields for r in streamed] == [r.fields for r in records] and streamed_stats.cut_long == 1
    untouched = ReadStats()
    assert list(read_piece(Piece(str(path), 0, "file"), "pile", untouched))[1].fields["text"] == huge
    assert untouched.cut_long == 0


LONG = 5000  # characters: over record_char_bound(64) = 2048
CUT_CASES = {
    "plain text": ("conditional_generation", {"text": "the quick brown fox jumps. " * 400}),
    "chinese text": ("causal_lm", {"text": "中文的长记录没有空格" * 600}),
    "leading blanks": ("dialogue", {"instruction": " " * LONG + "question", "input": "", "output": "answer"}),
    "blanks then text": ("task", {"input": "question" + " " * LONG + "tail", "output": "answer", "type": "math"}),
    "blanks inside a turn": ("dialogue", {"instruction": "q" + "\n" * LONG + "tail", "input": "", "output": "answer"}),
    "long target": ("task", {"input": "question", "output": "answer " * LONG, "type": "math"}),
    "long source": ("translation", {"en": "english words " * 600, "zh": "中文"}),
    "long turn": (
        "dialogue",
        {"turns": [{"human": "hi", "assistant": "你好 " * LONG}, {"human": "q", "assistant": "a"}]},
    ),
}


@pytest.mark.parametrize("backend", ["sentencepiece", "hf_fast"])
@pytest.mark.parametrize("case", list(CUT_CASES))
def test_the_cut_leaves_every_example_unchanged(case, backend, sample_tokenizer_dir):
    """Bugs caught: a bound too tight for the vocabulary (the cut text no longer fills the max_len window, so the
    example changes), and a cut inside a run of blanks that ``strip``/``rstrip`` then removes, shortening a task
    input or dialogue turn so that a target suddenly fits. Checked with the tokenizer training uses (the fast
    backend) and the SentencePiece model."""
    import sentencepiece as spm

    from billa.data.objectives import ObjectiveContext, variants
    from billa.data.readers import cut_long_text, record_char_bound

    if backend == "sentencepiece":
        encode = spm.SentencePieceProcessor(model_file=str(Path(sample_tokenizer_dir) / "tokenizer.model")).encode
    else:
        from billa.tokenizer.load import load_tokenizer

        tokenizer = load_tokenizer(sample_tokenizer_dir)
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = {
        "translation.en2zh": ["翻译成中文："],
        "translation.zh2en": ["Translate into English:"],
        "math.pre": ["Solve."],
    }
    ctx = ObjectiveContext(encode=encode, bos_id=1, eos_id=2, max_len=64, prompts=prompts)
    objective, fields = CUT_CASES[case]
    cut = cut_long_text(fields, record_char_bound(ctx.max_len))
    assert cut is not None and sum(map(len, _strings(cut))) < sum(map(len, _strings(fields)))
    assert variants(objective, cut, ctx) == variants(objective, fields, ctx)


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for v in items for s in _strings(v)]


# ---- convert.py op=expand_vocab with Chinese text only ------------------------------------------------------------
def test_expand_vocab_as_its_header_documents_runs_without_english_text(
    cache_dir, sample_corpus, tmp_path, caplog, monkeypatch
):
    """Bug caught: the header's command (Chinese text only) failing because the English report defaults to
    data/pile/train/*.jsonl, with an error naming op.chinese_text[0]; the absent report row must be left out with a
    warning naming op.english_text."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from billa.sample.tokenizer import sample_base_tokenizer

    from .helpers import ROOT

    monkeypatch.setenv("BILLA_DATA_DIR", str(tmp_path / "data"))  # no PILE there
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(
            "convert",
            overrides=[
                "op=expand_vocab",
                f"op.base_tokenizer={sample_base_tokenizer(cache_dir / 'sample')}",
                f"op.out_dir={tmp_path / 'vocab'}",
                "op.vocab_size=2200",
                f"op.chinese_text=[{{path: '{sample_corpus}/wudao/train/*.json', format: wudao}}]",
            ],
        )
    with caplog.at_level("WARNING", logger="billa"):
        report = instantiate(cfg.op)
    assert "zh" in report and "en" not in report and report["pieces_added"] > 0
    assert "no 'en' row (op.english_text[0]: no file matches any of" in caplog.text
    assert str(tmp_path / "data" / "pile" / "train" / "*.jsonl") in caplog.text


def test_expand_vocab_errors_name_the_key_of_their_source(tmp_path):
    """Bug caught: every source labelled op.chinese_text, so a bad English report file or a missing Chinese corpus
    sends the user to the wrong key."""
    from billa.convert.vocab import expand_vocab, texts_from_sources

    bad = tmp_path / "en.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataFormatError, match=re.escape(f"{bad}:2: not valid JSON")):
        list(texts_from_sources([{"path": str(bad), "format": "pile"}], "en", key="op.english_text"))
    with pytest.raises(FileNotFoundError, match=r"^op.english_text\[1\]: no file matches"):
        list(
            texts_from_sources(
                [
                    {"path": str(FIXTURES / "bom.jsonl"), "format": "pile"},
                    {"path": str(tmp_path / "x"), "format": "pile"},
                ],
                "en",
                key="op.english_text",
            )
        )
    chinese = [{"path": str(tmp_path / "wudao" / "*.json"), "format": "wudao"}]
    english = [{"path": str(tmp_path / "pile" / "*.jsonl"), "format": "pile"}]
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"op.chinese_text[0]: no file matches '{chinese[0]['path']}'")
    ):
        expand_vocab(
            "unused", chinese, str(tmp_path / "out"), report_text={"en": english, "zh": chinese}, english_text=english
        )
