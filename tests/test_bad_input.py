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
