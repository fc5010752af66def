"""Recipe fidelity, vocabulary and optimiser: merge order on a LLaMA-range base, exact piece count, English in the
report, BiLLa's warmup, weight decay on every parameter, residual dropout, config errors as messages."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from billa.config import ConfigError, exit_on_config_error
from billa.model.builders import add_residual_dropout
from billa.model.schedule import cosine_with_warmup
from billa.sample.tokenizer import sample_base_tokenizer
from billa.tokenizer.expand import NORMAL, load_base_model_proto, merge_pieces

from .helpers import ROOT, run_door, tiny_llama, tiny_module


@pytest.fixture(scope="module")
def llama_range_base(cache_dir, sample_tokenizer_dir) -> sp_pb2.ModelProto:
    """The sample base with LLaMA's score range: merges from 0 down to -31,000, and "▁▁" at -1e9 as in LLaMA."""
    base = load_base_model_proto(sample_base_tokenizer(cache_dir / "sample"))
    normal = [p for p in base.pieces if p.type == NORMAL]
    for k, piece in enumerate(normal):
        piece.score = -31000.0 * k / (len(normal) - 1)
    sentinel = next((p for p in normal if p.piece == "▁▁"), None) or base.pieces.add()
    sentinel.piece, sentinel.score, sentinel.type = "▁▁", -1e9, NORMAL
    return base


def test_new_pieces_keep_their_order_with_distinct_scores_below_llama_sentinel(llama_range_base, sample_tokenizer_dir):
    """Bug caught: scores counted down from -1e8 in steps of 1.0 collapse in float32 (8 apart there), so groups of
    new pieces share a score and the Chinese model's merge order is lost (an audit saw 2,486 pieces, 312 scores)."""
    chinese = load_base_model_proto(sample_tokenizer_dir)  # a model whose added pieces are in merge order
    merged = merge_pieces(llama_range_base, chinese)
    n_base = len(llama_range_base.pieces)
    new = merged.pieces[n_base:]
    assert len(new) > 1000
    scores = np.array([p.score for p in new], dtype=np.float32)
    assert len(set(scores.tolist())) == len(new)  # distinct after the float32 round trip of the proto
    assert np.all(np.diff(scores) < 0)  # strictly decreasing: the Chinese model's order is kept
    assert scores.max() < -1e9  # below every base merge, the sentinel included
    expected = [
        p.piece
        for p in chinese.pieces
        if p.type == NORMAL
        and p.piece not in {q.piece for q in llama_range_base.pieces}
        and not p.piece.replace("▁", " ").isascii()
    ]  # noqa: E501
    assert [p.piece for p in new] == expected
    # the saved model reads back with the same order: SentencePiece loads the float32 scores as written
    processor = spm.SentencePieceProcessor(model_proto=merged.SerializeToString())
    back = [processor.get_score(i) for i in range(n_base, len(merged.pieces))]
    assert all(a > b for a, b in zip(back, back[1:], strict=False))


def test_added_pieces_gives_exactly_n(llama_range_base, sample_tokenizer_dir):
    """Bug caught: op.added_pieces ignored (BiLLa's 14,943 cannot be reproduced) or off by the filtered pieces."""
    chinese = load_base_model_proto(sample_tokenizer_dir)
    merged = merge_pieces(llama_range_base, chinese, limit=777)
    assert (
        len(merged.pieces) - len(llama_range_base.pieces)
        == 777
        == merged.trainer_spec.vocab_size - len(llama_range_base.pieces)
    )
    everything = merge_pieces(llama_range_base, chinese)
    assert [p.piece for p in merged.pieces] == [p.piece for p in everything.pieces[: len(merged.pieces)]]
    with pytest.raises(ValueError, match=r"op.added_pieces=100000: the Chinese model offers only \d+"):
        merge_pieces(llama_range_base, chinese, limit=100000)


def test_expand_vocab_reports_english_by_default_and_honours_added_pieces(
    compose, cache_dir, sample_corpus, sample_tokenizer_dir, tmp_path
):
    """Bug caught: the default report measures Chinese only, so an English regression goes unseen."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(
            "convert",
            overrides=[
                "op=expand_vocab",
                f"op.base_tokenizer={sample_base_tokenizer(cache_dir / 'sample')}",
                f"op.out_dir={tmp_path / 'vocab'}",
                "op.vocab_size=2200",
                "op.added_pieces=500",
                f"op.chinese_text=[{{path: '{sample_corpus}/wudao/train/*.json', format: wudao}}]",
                f"op.english_text=[{{path: '{sample_corpus}/pile/val.jsonl', format: pile}}]",
            ],
        )
    assert set(cfg.op.report_text) == {"zh", "en"}
    report = instantiate(cfg.op)
    assert report["pieces_added"] == 500
    assert report["en"]["after"]["tokens"] == report["en"]["before"]["tokens"] > 100  # English unchanged
    assert report["zh"]["after"]["tokens"] < report["zh"]["before"]["tokens"]


# ---- optimiser and schedule ---------------------------------------------------------------------------------------
def test_warmup_first_step_is_not_lr_zero():
    """Bug caught: warmup factor s/warmup makes BiLLa's first step a wasted lr-0 step (BiLLa: (s+1)/warmup)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=3e-5)
    scheduler = cosine_with_warmup(optimizer, total_steps=20000, warmup_steps=2000, min_lr_ratio=0.1)
    lrs = []
    for _ in range(2001):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for step in (0, 1, 999, 1998, 1999):
        assert lrs[step] == pytest.approx(3e-5 * (step + 1) / 2000, rel=1e-12)
    assert lrs[2000] == pytest.approx(3e-5)


def _tiny_module(compose, overrides):
    from billa.config import plan_hardware

    cfg = compose(["logger=none", "trainer.max_steps=10", "scheduler.warmup_steps=2", *overrides])
    module = tiny_module(
        cfg.model, 300, optimizer=plan_hardware(cfg).optimizer, scheduler=cfg.scheduler, total_steps=10
    )
    return module, module.configure_optimizers()["optimizer"]


def test_weight_decay_on_every_parameter_by_default_and_not_on_norms_by_choice(compose):
    """Bug caught: norms silently excluded from weight decay (BiLLa's HybridAdam decays every parameter)."""
    module, optimizer = _tiny_module(compose, [])
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    norms = [p for n, p in module.model.named_parameters() if "norm" in n]
    assert norms and all(id(p) in decayed for p in module.model.parameters())
    module, optimizer = _tiny_module(compose, ["optimizer.weight_decay_on=matrices"])
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    norms = [p for n, p in module.model.named_parameters() if "norm" in n]
    assert {id(p) for p in norms} == no_decay
    with pytest.raises(ConfigError, match="optimizer.weight_decay_on='norms'"):
        _tiny_module(compose, ["optimizer.weight_decay_on=norms"])


def test_residual_dropout_is_active_in_training_only():
    """Bug caught: model.residual_dropout accepted but never applied (or applied at eval, changing exports)."""
    model = tiny_llama(100, seed=0, num_attention_heads=2, num_key_value_heads=2)
    ids = torch.arange(1, 17).view(1, 16)
    model.eval()
    reference = model(ids).logits
    seen: dict[str, list] = {"attn": [], "mlp": []}

    def capture(kind):
        def hook(module, args, output):
            seen[kind].append(output[0] if isinstance(output, tuple) else output)

        return hook

    layer = model.model.layers[1]
    layer.self_attn.register_forward_hook(capture("attn"))  # before the dropout hooks: the raw outputs
    layer.mlp.register_forward_hook(capture("mlp"))
    assert add_residual_dropout(model, 0.05) == 4  # attention + MLP of 2 layers
    layer.self_attn.register_forward_hook(capture("attn"))  # after: what joins the residual stream
    layer.mlp.register_forward_hook(capture("mlp"))
    assert torch.equal(model(ids).logits, reference)  # eval: no dropout
    model.train()
    torch.manual_seed(1)
    first = model(ids).logits
    torch.manual_seed(2)
    second = model(ids).logits
    assert not torch.equal(first, reference) and not torch.equal(first, second)
    for kind in ("attn", "mlp"):  # both residual branches: ~5% zeroed, the rest scaled by 1/(1-p)
        raw, dropped = seen[kind][-2], seen[kind][-1]
        zeroed = (dropped == 0) & (raw != 0)
        assert 0.01 < zeroed.float().mean().item() < 0.12, kind
        torch.testing.assert_close(dropped[~zeroed], raw[~zeroed] / 0.95)
    with pytest.raises(ConfigError, match="model.residual_dropout=1.5"):
        add_residual_dropout(model, 1.5)


# ---- config errors are messages -----------------------------------------------------------------------------------
def test_config_error_is_one_message_and_exit_2(capsys, monkeypatch):
    """Bug caught: a ConfigError reaches the user as a traceback (exit 1) instead of a message naming the keys."""
    from hydra.errors import InstantiationException

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop, exit_on_config_error():
        raise ConfigError("batch.global_size=7 is not a multiple of hardware.micro_batch_size=2")
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("billa: error: batch.global_size=7")
    with pytest.raises(SystemExit), exit_on_config_error():  # wrapped by hydra.utils.instantiate
        raise InstantiationException("Error in call to target") from ConfigError("op.added_pieces=9")
    assert "billa: error: op.added_pieces=9" in capsys.readouterr().err
    with pytest.raises(KeyError), exit_on_config_error():  # other exceptions are not swallowed
        raise KeyError("bug")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError), exit_on_config_error():
        raise ConfigError("x")


def test_train_py_prints_billa_error_and_exits_2(tmp_path):
    """Bug caught: the entry point lets Hydra print a stack trace for a user's non-dividing batch."""
    args = ["train.py", "logger=none", "batch.global_size=7", f"hydra.run.dir={tmp_path}"]
    result = run_door(*args, timeout=120, env={"HYDRA_FULL_ERROR": None})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "billa: error: batch.global_size=7 is not a multiple of hardware.micro_batch_size" in result.stderr
    assert "Traceback" not in result.stderr
    full = run_door(*args, timeout=120, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigError" in full.stderr


# ---- exact mix per rank -------------------------------------------------------------------------------------------
def test_exact_mix_per_rank_checks_the_micro_batch(compose):
    """Bug caught: data.exact_mix_per_rank=true accepted with a micro batch that splits the cycle, so ranks see
    different mixes while the user believes each holds BiLLa's exact 10 + 10."""
    from collections import Counter

    from torch.utils.data import DataLoader

    from billa.config import validate
    from billa.data.mixing import MixedDataset, StreamSampler
    from billa.data.objectives import Example

    base = ["stage=task_mix", "data.exact_mix_per_rank=true", "hardware.devices=2", "trainer.max_steps=30"]
    with pytest.raises(ConfigError, match=r"hardware.micro_batch_size`=8 to be a multiple of the mix cycle 20"):
        validate(compose([*base, "hardware.micro_batch_size=8", "batch.global_size=32"]))
    cfg = compose([*base, "hardware.micro_batch_size=20", "batch.global_size=80"])
    plan = validate(cfg)
    assert (plan.micro_size, plan.accumulation) == (20, 2)
    mix = dict(cfg.data.mix)
    sources = {name: [Example([k, i], [k, i]) for i in range(3 + k)] for k, name in enumerate(mix)}
    data = MixedDataset(sources, mix, num_samples=80 * 3, seed=0)
    for rank in range(2):
        sampler = StreamSampler(len(data), rank, 2, block=plan.micro_size)
        for batch in DataLoader(data, batch_size=20, sampler=sampler, collate_fn=lambda items: items):
            assert Counter(item["source"] for item in batch) == Counter(mix)
