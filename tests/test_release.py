"""Release format (embedding rows + original LLaMA): release -> restore round trips, layouts, refusals, verify."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from billa.convert.layout import HF_EMBED, META_EMBED, LayoutError
from billa.convert.release import MANIFEST, RESIDUAL, ReleaseError, release, restore, tensor_sha256, verify

from .conftest import CONF
from .helpers import run_door, tiny_llama

BASE_VOCAB, VOCAB = 48, 64  # the "LLaMA" vocabulary and the expanded one (LLaMA-7B: 32,000 and 46,943)


ARCH = dict(
    hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64
)


@pytest.fixture(scope="module")
def llama_embedding() -> torch.Tensor:
    """LLaMA's rows as Meta ships them: fp16."""
    torch.manual_seed(0)
    return tiny_llama(BASE_VOCAB, **ARCH).model.embed_tokens.weight.detach().half()


@pytest.fixture(scope="module")
def llama_meta(tmp_path_factory, llama_embedding) -> Path:
    """Meta's layout: consolidated.00.pth with tok_embeddings.weight (+ a few other keys) and params.json."""
    path = tmp_path_factory.mktemp("llama-meta")
    state = {META_EMBED: llama_embedding.clone(), "norm.weight": torch.ones(16).half()}
    state["output.weight"] = torch.randn(BASE_VOCAB, 16).half()
    torch.save(state, path / "consolidated.00.pth")
    (path / "params.json").write_text(json.dumps({"dim": 16, "n_layers": 2, "n_heads": 2, "vocab_size": -1}))
    return path / "consolidated.00.pth"


@pytest.fixture(scope="module")
def llama_hf(tmp_path_factory, llama_embedding) -> Path:
    """The same LLaMA as a HF directory, converted to fp32 (values identical to Meta's fp16)."""
    path = tmp_path_factory.mktemp("llama-hf")
    model = tiny_llama(BASE_VOCAB, **ARCH)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(llama_embedding.float())
    model.save_pretrained(path)
    return path


def trained_model(llama_embedding: torch.Tensor, dtype: torch.dtype, seed: int = 1) -> LlamaForCausalLM:
    """An expanded-vocabulary model whose first rows stayed near LLaMA's, as after continued pretraining."""
    torch.manual_seed(seed)
    model = tiny_llama(VOCAB, **ARCH)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:BASE_VOCAB] = llama_embedding.float() + 0.003 * torch.randn(BASE_VOCAB, 16)
    return model.to(dtype)


def write_layout(model: LlamaForCausalLM, out: Path, fmt: str = "safetensors", shards: int = 1, embed_last=False):
    """Write ``model`` as a HF directory: one file, or ``shards`` files + index with the embedding first or last."""
    out.mkdir(parents=True)
    model.config.save_pretrained(out)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    names = sorted(state, key=lambda k: (k == HF_EMBED) == embed_last)  # stable: embedding moved to one end
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    size = -(-len(names) // shards)  # contiguous chunks: the embedding lands in the first or the last file
    groups = [names[i * size : (i + 1) * size] for i in range(shards)]
    files = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    where = {}
    for file, group in zip(files, groups, strict=True):
        tensors = {k: state[k] for k in group}
        if ext == "safetensors":
            save_file(tensors, out / file, metadata={"format": "pt"})
        else:
            torch.save(tensors, out / file)
        where.update(dict.fromkeys(group, file))
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps({**index, "weight_map": where}))
    (out / "generation_config.json").write_text("{}")
    return where[HF_EMBED]


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in directory.iterdir():
        if path.suffix == ".safetensors" and path.name != RESIDUAL:
            state.update(load_file(path))
        elif path.suffix == ".bin":
            state.update(torch.load(path, weights_only=True))
    return state


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_release_then_restore_is_bit_exact(dtype, llama_meta, llama_embedding, tmp_path):
    """Bugs caught: restore by plain subtraction (loses the last bit for about half the elements), a residual
    computed differently from restore, the dtype changed on the way, the added rows or lm_head shifted too."""
    trained = tmp_path / "trained"
    write_layout(trained_model(llama_embedding, dtype), trained)
    before = file_hashes(trained)

    manifest = release(trained, llama_meta, tmp_path / "released")
    released = load_all(tmp_path / "released")
    original = load_all(trained)
    expected = (original[HF_EMBED][:BASE_VOCAB].double() + llama_embedding.double()).to(dtype)  # (48, 16)
    assert released[HF_EMBED].dtype == dtype and released[HF_EMBED].shape == (VOCAB, 16)
    assert torch.equal(released[HF_EMBED][:BASE_VOCAB], expected)
    assert torch.equal(released[HF_EMBED][BASE_VOCAB:], original[HF_EMBED][BASE_VOCAB:])
    assert torch.equal(released["lm_head.weight"], original["lm_head.weight"])
    assert manifest["trained_sha256"] == tensor_sha256(original[HF_EMBED])
    assert manifest["llama_rows"] == BASE_VOCAB and manifest["dtype"] == str(dtype).removeprefix("torch.")
    # The sum has one exponent more than the trained rows: plain subtraction loses bits, the residual puts them back.
    plain = (released[HF_EMBED][:BASE_VOCAB].double() - llama_embedding.double()).to(dtype)
    assert not torch.equal(plain, original[HF_EMBED][:BASE_VOCAB])
    assert manifest["elements_inexact_without_residual"] > 0 and (tmp_path / "released" / RESIDUAL).is_file()

    result = restore(tmp_path / "released", llama_meta, tmp_path / "restored")
    assert result["bit_exact"] is True and result["state"] == "restored"
    assert_bit_identical(load_all(tmp_path / "restored"), original)
    assert file_hashes(trained) == before  # the input is untouched


@pytest.mark.parametrize(
    "fmt,embed_last,release_with,restore_with",
    [
        ("safetensors", True, "meta", "hf"),  # embedding in the last of 3 shards; Meta side, then HF side
        ("bin", False, "hf", "meta"),  # pytorch_model-*.bin shards, embedding in the first
    ],
)
def test_sharded_layouts(fmt, embed_last, release_with, restore_with, llama_meta, llama_hf, llama_embedding, tmp_path):
    """Bugs caught: a hard-coded shard name (BiLLa's script), ignoring the index, rewriting or dropping other
    shards, Meta and HF LLaMA sides giving different results (fp16 vs fp32 copies of the same values)."""
    sides = {"meta": llama_meta, "hf": llama_hf}
    trained = tmp_path / "trained"
    embed_file = write_layout(trained_model(llama_embedding, torch.bfloat16), trained, fmt, 3, embed_last)
    assert embed_file.startswith("model-00003" if embed_last else "pytorch_model-00001")

    manifest = release(trained, sides[release_with], tmp_path / "released")
    assert manifest["file"] == embed_file
    released_hashes, trained_hashes = file_hashes(tmp_path / "released"), file_hashes(trained)
    changed = {name for name in trained_hashes if released_hashes[name] != trained_hashes[name]}
    assert changed == {embed_file}  # every other shard, the index and the config are copied unchanged
    assert set(released_hashes) - set(trained_hashes) == {MANIFEST, RESIDUAL}

    restore(tmp_path / "released", sides[restore_with], tmp_path / "restored")
    assert_bit_identical(load_all(tmp_path / "restored"), load_all(trained))
    restored_hashes = file_hashes(tmp_path / "restored")
    assert {n for n in trained_hashes if restored_hashes[n] != trained_hashes[n]} <= {embed_file}


def test_restored_model_gives_the_same_logits(llama_hf, llama_embedding, tmp_path):
    """Bug caught: a restored directory transformers cannot load, or one whose forward pass differs."""
    trained = tmp_path / "trained"
    write_layout(trained_model(llama_embedding, torch.float32), trained, "safetensors", 3, embed_last=True)
    release(trained, llama_hf, tmp_path / "released")
    restore(tmp_path / "released", llama_hf, tmp_path / "restored")
    ids = torch.tensor([[1, 5, 47, 48, 63, 2]])  # LLaMA rows and added rows
    logits = {}
    for name in ("trained", "released", "restored"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            logits[name] = model(ids).logits  # (1, 6, 64)
    assert logits["trained"].shape == (1, 6, VOCAB)
    torch.testing.assert_close(logits["restored"], logits["trained"], rtol=0, atol=0)
    assert not torch.allclose(logits["released"], logits["trained"])


@pytest.fixture
def released_dir(llama_meta, llama_embedding, tmp_path) -> Path:
    write_layout(trained_model(llama_embedding, torch.float16), tmp_path / "trained")
    release(tmp_path / "trained", llama_meta, tmp_path / "released")
    return tmp_path / "released"


def test_wrong_llama_is_refused_with_input_untouched(released_dir, tmp_path):
    """Bug caught: restoring with other LLaMA weights (another model size's file, a fine-tuned copy) silently
    writes garbage weights."""
    other = tmp_path / "other-llama"
    other.mkdir()
    torch.save({META_EMBED: torch.randn(BASE_VOCAB, 16).half()}, other / "consolidated.00.pth")
    before = file_hashes(released_dir)
    with pytest.raises(ReleaseError, match=r"op\.llama=.*wrong LLaMA weights"):
        restore(released_dir, other / "consolidated.00.pth", tmp_path / "restored")
    assert not (tmp_path / "restored").exists() and not (tmp_path / "restored.tmp").exists()
    assert file_hashes(released_dir) == before


def test_double_restore_and_double_release_are_refused(released_dir, llama_meta, tmp_path):
    """Bug caught: restoring a restored directory (BiLLa issue: users ran the script twice) subtracts LLaMA again."""
    restore(released_dir, llama_meta, tmp_path / "restored")
    before = file_hashes(tmp_path / "restored")
    with pytest.raises(ReleaseError, match="already restored"):
        restore(tmp_path / "restored", llama_meta, tmp_path / "restored-twice")
    with pytest.raises(ReleaseError, match="already released"):
        release(released_dir, llama_meta, tmp_path / "released-twice")
    # Restored in place by another tool: the manifest still says released, but the tensor is the trained one.
    in_place = tmp_path / "in-place"
    shutil.copytree(released_dir, in_place)
    shutil.copy(tmp_path / "restored" / "model.safetensors", in_place / "model.safetensors")
    with pytest.raises(ReleaseError, match="already restored: the embedding matches the trained checksum"):
        restore(in_place, llama_meta, tmp_path / "restored-in-place")
    assert file_hashes(tmp_path / "restored") == before
    assert not any((tmp_path / n).exists() for n in ("restored-twice", "released-twice", "restored-in-place"))


def test_changed_dtype_is_refused(released_dir, llama_meta, tmp_path):
    """Bug caught: a release re-saved in fp32 is restored and its checksum failure blamed on LLaMA."""
    converted = tmp_path / "fp32"
    shutil.copytree(released_dir, converted)
    state = load_file(converted / "model.safetensors")
    save_file({k: v.float() for k, v in state.items()}, converted / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ReleaseError, match="wrong dtype: the stored embedding is float32 but was released as float16"):
        restore(converted, llama_meta, tmp_path / "restored")


def test_missing_residual_restores_within_rounding(released_dir, llama_meta, llama_embedding, tmp_path):
    """Bug caught: without the residual file the restore is refused (or claimed exact) although LLaMA is verified."""
    partial = tmp_path / "partial"
    shutil.copytree(released_dir, partial)
    (partial / RESIDUAL).unlink()
    result = restore(partial, llama_meta, tmp_path / "restored")
    assert result["bit_exact"] is False and result["verified"] is True
    restored = load_file(tmp_path / "restored" / "model.safetensors")[HF_EMBED][:BASE_VOCAB].double()
    trained = load_file(tmp_path / "trained" / "model.safetensors")[HF_EMBED][:BASE_VOCAB].double()
    # Two roundings, each at most half a unit in the last place: of the sum (|T + L|) and of the difference (|T|).
    bound = torch.finfo(torch.float16).eps / 2 * ((trained + llama_embedding.double()).abs() + trained.abs())
    error = (restored - trained).abs()  # (48, 16)
    assert error.max() > 0 and bool((error <= bound).all())  # rounding only, not garbage
    assert verify(tmp_path / "restored")["verdict"].startswith("restored within rounding")


def test_verify_reports_released_restored_and_modified(released_dir, llama_meta, tmp_path):
    """Bugs caught: verify trusting the manifest's word instead of the checksum; a tampered tensor reported fine."""
    assert verify(released_dir, llama_meta)["state"] == "released"
    assert verify(released_dir, llama_meta)["llama_matches"] is True
    restore(released_dir, llama_meta, tmp_path / "restored")
    assert verify(tmp_path / "restored")["state"] == "restored"
    tampered = tmp_path / "tampered"
    shutil.copytree(released_dir, tampered)
    state = load_file(tampered / "model.safetensors")
    state[HF_EMBED][3, 4] += 1
    save_file(state, tampered / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ReleaseError, match="modified"):
        verify(tampered)
    # No manifest: estimated from the distances to LLaMA's rows and to twice them.
    for name, state_name in (("trained", "restored"), ("released", "released")):
        bare = tmp_path / f"bare-{name}"
        shutil.copytree(tmp_path / name if name == "trained" else released_dir, bare)
        (bare / MANIFEST).unlink(missing_ok=True)
        result = verify(bare, llama_meta)
        assert result["state"] == state_name and result["checksum_ok"] is None
    with pytest.raises(ReleaseError, match=r"pass op\.llama="):
        verify(tmp_path / "bare-trained")


def test_convert_ops_through_hydra(llama_meta, llama_embedding, tmp_path):
    """Bug caught: conf/op/{release,restore,verify}.yaml not matching the functions' parameters."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from billa.convert import run

    write_layout(trained_model(llama_embedding, torch.bfloat16), tmp_path / "trained")
    steps = [
        ["op=release", f"op.model={tmp_path / 'trained'}", f"op.llama={llama_meta}", f"op.out_dir={tmp_path / 'r'}"],
        ["op=restore", f"op.model={tmp_path / 'r'}", f"op.llama={llama_meta}", f"op.out_dir={tmp_path / 'o'}"],
        ["op=verify", f"op.model={tmp_path / 'o'}", f"op.llama={llama_meta}"],
    ]
    results = []
    for overrides in steps:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            results.append(run(compose("convert", overrides=overrides)))
    assert results[0]["state"] == "released" and results[1]["bit_exact"] is True
    assert results[2]["state"] == "restored" and results[2]["llama_matches"] is True


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~15 s on a loaded CI machine
def test_cli_refusal_names_the_cause(released_dir, tmp_path):
    """Bug caught: a refusal that ends in a stack trace or a zero exit status."""
    result = run_door(
        "convert.py",
        "op=restore",
        f"op.model={released_dir}",
        f"op.llama={released_dir}",
        f"op.out_dir={tmp_path / 'out'}",
    )
    assert result.returncode != 0
    assert "wrong LLaMA weights" in result.stderr and "Traceback" not in result.stderr


def test_meta_model_parallel_shards_are_joined(llama_meta, llama_embedding, tmp_path):
    """Bug caught: only consolidated.00.pth read for a model-parallel Meta checkpoint (13B+: the embedding
    dimension is split across consolidated.NN.pth), giving a hidden-size mismatch or half an embedding."""
    meta = tmp_path / "llama-mp2"
    meta.mkdir()
    for rank, part in enumerate(llama_embedding.chunk(2, dim=1)):  # (48, 8) each
        torch.save({META_EMBED: part.clone()}, meta / f"consolidated.{rank:02d}.pth")
    write_layout(trained_model(llama_embedding, torch.float32), tmp_path / "trained")
    joined = release(tmp_path / "trained", meta, tmp_path / "released-mp2")
    single = release(tmp_path / "trained", llama_meta, tmp_path / "released-single")
    assert joined["llama_sha256"] == single["llama_sha256"]
    assert joined["released_sha256"] == single["released_sha256"]


def test_release_without_manifest_needs_the_explicit_flag(released_dir, llama_meta, llama_embedding, tmp_path):
    """Bug caught: a directory without a manifest (BiLLa's own release, or files copied without it) restored
    silently without any check."""
    bare = tmp_path / "bare"
    shutil.copytree(released_dir, bare)
    (bare / MANIFEST).unlink()
    with pytest.raises(ReleaseError, match=r"no billa_release.json.*op\.require_manifest=false"):
        restore(bare, llama_meta, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    result = restore(bare, llama_meta, tmp_path / "restored", require_manifest=False)
    assert result["verified"] is False and result["state"] == "restored"
    released = load_file(bare / "model.safetensors")[HF_EMBED]
    restored = load_file(tmp_path / "restored" / "model.safetensors")[HF_EMBED]
    expected = (released[:BASE_VOCAB].double() - llama_embedding.double()).to(released.dtype)  # plain subtraction
    assert torch.equal(restored[:BASE_VOCAB], expected) and torch.equal(restored[BASE_VOCAB:], released[BASE_VOCAB:])
    assert verify(tmp_path / "restored")["state"] == "restored"


@pytest.fixture
def sharded_release(llama_meta, llama_embedding, tmp_path) -> tuple[Path, str, str]:
    """A release in 3 safetensors shards: the embedding in the first, lm_head in the last (another file)."""
    trained = tmp_path / "trained"
    embed_file = write_layout(trained_model(llama_embedding, torch.float16), trained, "safetensors", 3)
    release(trained, llama_meta, tmp_path / "released")
    index = json.loads((trained / "model.safetensors.index.json").read_text())
    head_file = index["weight_map"]["lm_head.weight"]
    assert head_file != embed_file  # the case the embedding's checksum alone misses
    return tmp_path / "released", embed_file, head_file


def zero_tensor(path: Path, name: str) -> None:
    """Rewrite one safetensors file with ``name`` zeroed: same size, same tensors, other bytes."""
    state = load_file(path)
    state[name] = torch.zeros_like(state[name])
    save_file(state, path, metadata={"format": "pt"})


def test_manifest_lists_every_file_and_the_untouched_release_passes(sharded_release, llama_meta, tmp_path):
    """Bugs caught: a manifest that leaves out a shard, the index or the config (then a change there passes
    verify); a checksum recorded before the file was written (the untouched release fails its own verify); an
    added README refused although the weights are intact."""
    released, _, _ = sharded_release
    manifest = json.loads((released / MANIFEST).read_text())
    on_disk = {name: sha for name, sha in file_hashes(released).items() if name != MANIFEST}
    assert {name: record["sha256"] for name, record in manifest["files"].items()} == on_disk
    assert all(record["bytes"] == (released / name).stat().st_size for name, record in manifest["files"].items())
    assert {"model.safetensors.index.json", "config.json", RESIDUAL} <= set(manifest["files"])

    (released / "README.md").write_text("added after the release\n")
    result = verify(released, llama_meta)
    assert result["state"] == "released" and result["llama_matches"] is True
    assert result["files_checked"] == len(on_disk) and result["unlisted_files"] == ["README.md"]
    restored = restore(released, llama_meta, tmp_path / "restored")
    assert restored["bit_exact"] is True
    assert_bit_identical(load_all(tmp_path / "restored"), load_all(tmp_path / "trained"))
    assert verify(tmp_path / "restored")["state"] == "restored"  # its own manifest lists the restored files


def test_zeroed_lm_head_in_another_shard_is_named(sharded_release, llama_meta, tmp_path):
    """Bug caught (issue 23): only the embedding's checksum checked, so a zeroed lm_head in another shard
    passes verify and restores as 'bit-exact'."""
    released, _, head_file = sharded_release
    zero_tensor(released / head_file, "lm_head.weight")
    with pytest.raises(ReleaseError, match=rf"{head_file}: modified: SHA-256 .* but {MANIFEST} records"):
        verify(released)
    with pytest.raises(ReleaseError, match=rf"{head_file}: modified"):
        restore(released, llama_meta, tmp_path / "restored")
    assert not (tmp_path / "restored").exists() and not (tmp_path / "restored.tmp").exists()


def test_changed_tensor_beside_the_embedding_is_named(released_dir, llama_meta, tmp_path):
    """Bug caught: the embedding's file skipped because its bytes differ between released and restored, so a
    zeroed lm_head stored beside the embedding (single-file model) passes in either state."""
    tampered = tmp_path / "tampered"
    shutil.copytree(released_dir, tampered)
    zero_tensor(tampered / "model.safetensors", "lm_head.weight")
    with pytest.raises(ReleaseError, match=r"model\.safetensors: tensor 'lm_head.weight' modified"):
        verify(tampered)
    with pytest.raises(ReleaseError, match=r"model\.safetensors: tensor 'lm_head.weight' modified"):
        restore(tampered, llama_meta, tmp_path / "from-tampered")
    restore(released_dir, llama_meta, tmp_path / "restored")  # the restored state: the file's bytes are new
    zero_tensor(tmp_path / "restored" / "model.safetensors", "lm_head.weight")
    with pytest.raises(ReleaseError, match=r"model\.safetensors: tensor 'lm_head.weight' modified"):
        verify(tmp_path / "restored")


def test_verify_with_the_wrong_llama_fails_naming_it(released_dir, tmp_path):
    """Bug caught: verify with other LLaMA weights only logs a warning and succeeds, so a user goes on to restore
    with them (or trusts a check that never compared the base)."""
    other = tmp_path / "other-llama.pth"
    torch.manual_seed(7)
    torch.save({META_EMBED: torch.randn(BASE_VOCAB, 16).half()}, other)
    with pytest.raises(ReleaseError, match=rf"op\.llama={re.escape(str(other))}: wrong LLaMA weights"):
        verify(released_dir, other)


def test_truncated_shard_is_named(sharded_release, llama_meta, tmp_path):
    """Bug caught: a truncated download ends in a bare SafetensorError (which file?) or, for a shard restore only
    copies, is restored and verified as fine; a truncated trained shard released with its checksum."""
    released, embed_file, head_file = sharded_release
    for name in (head_file, embed_file):
        cut = tmp_path / f"cut-{name}"
        shutil.copytree(released, cut)
        data = (cut / name).read_bytes()
        (cut / name).write_bytes(data[: len(data) // 2])
        error = ReleaseError if name == head_file else LayoutError  # the embedding's file is read, then named
        named = rf"{re.escape(name)}: .*(bytes, but {MANIFEST} records|truncated)"
        with pytest.raises(error, match=named):
            verify(cut)
        with pytest.raises(error, match=named):
            restore(cut, llama_meta, tmp_path / f"out-{name}")
        (cut / MANIFEST).unlink()  # no manifest: the reader's error still names the file
        if name == embed_file:
            with pytest.raises(LayoutError, match=rf"{name}: not a readable weight file"):
                verify(cut, llama_meta)
    trained_cut = tmp_path / "trained-cut"
    shutil.copytree(tmp_path / "trained", trained_cut)
    data = (trained_cut / head_file).read_bytes()
    (trained_cut / head_file).write_bytes(data[:-8])
    with pytest.raises(LayoutError, match=rf"{head_file}: not a readable weight file"):
        release(trained_cut, llama_meta, tmp_path / "released-cut")
    assert not (tmp_path / "released-cut").exists()


@pytest.mark.slow  # two fresh interpreters importing torch + transformers
def test_cli_verify_fails_on_a_changed_file_and_a_wrong_llama(sharded_release, tmp_path):
    """Bug caught: op=verify exiting 0 (with a warning) for the wrong LLaMA or a changed shard, so a script that
    checks the exit status goes on with bad weights."""
    released, _, head_file = sharded_release
    other = tmp_path / "other-llama.pth"
    torch.save({META_EMBED: torch.randn(BASE_VOCAB, 16).half()}, other)
    wrong_base = run_door("convert.py", "op=verify", f"op.model={released}", f"op.llama={other}")
    assert wrong_base.returncode != 0
    assert f"op.llama={other}: wrong LLaMA weights" in wrong_base.stderr and "Traceback" not in wrong_base.stderr
    zero_tensor(released / head_file, "lm_head.weight")
    changed = run_door("convert.py", "op=verify", f"op.model={released}")
    assert changed.returncode != 0 and f"{head_file}: modified" in changed.stderr
