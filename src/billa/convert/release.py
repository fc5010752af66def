"""Release format: the first rows of the input embedding hold trained + original LLaMA; restore subtracts them.

``release`` and ``restore`` read a HF model directory of any sharding, rewrite only the file that holds
``model.embed_tokens.weight`` and copy every other file unchanged into a new directory (inputs are never modified).
Only the rows LLaMA has (its own vocabulary size, 32,000) change; added rows and ``lm_head`` stay as trained.

Exactness: the released tensor keeps the stored dtype and holds ``round(trained + llama)`` (the sum computed in
float64, rounded once). Float rounding is not invertible in the stored dtype: where ``|trained + llama|`` is larger
than ``|trained|`` the sum has fewer representable values than the trained weights, so ``released - llama``
differs from ``trained`` in the last bit for a share of the elements. ``release`` therefore also writes
``billa_release_residual.safetensors``: per element the XOR of the trained bit pattern and the bit pattern that
plain subtraction gives back (mostly 0; int16 for fp16/bf16, int32 for fp32). ``restore`` subtracts in float64,
rounds once, applies the residual and checks the SHA-256 of the result against the manifest, so a restore is
bit-exact or refused. Without the residual file (``exact=false``, or not downloaded) a restore is within rounding
of the trained weights and the manifest's ``plain_restore_sha256`` still proves the LLaMA weights were right.

Integrity: the manifest also records the size and SHA-256 of every file of the directory it describes (``files``)
and of every other tensor in the embedding's file (``shard_tensors_sha256``). ``verify`` and ``restore`` check them
all before trusting the directory, so a changed ``lm_head`` or config, or a truncated shard, is named by its file;
the embedding's file is checked tensor by tensor, since the embedding itself legitimately differs between the
released and the restored state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from billa.convert.layout import (
    HF_EMBED,
    LayoutError,
    check_readable,
    load_llama_embedding,
    load_shard,
    read_tensor,
    save_shard,
    tensor_file,
    weight_files,
)
from billa.utils.errors import BillaError
from billa.utils.logging import get_logger

log = get_logger(__name__)

MANIFEST = "billa_release.json"
RESIDUAL = "billa_release_residual.safetensors"
FORMAT = "billa-embedding-delta/2"  # /2 added the checksums of every file; /1 manifests (embedding only) still read
OLD_FORMATS = ("billa-embedding-delta/1",)
CHUNK_ROWS = 4096  # rows per float64 step: 4096 x 4096 x 8 bytes = 128 MiB for LLaMA-7B
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-width integer views for the XOR residual


class ReleaseError(BillaError, ValueError):
    """A release, restore or verify that would give wrong weights; the message names the likely cause."""


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes in its own dtype, row-major, native (little-endian) byte order."""
    digest = hashlib.sha256()
    tensor = tensor.reshape(1) if tensor.ndim == 0 else tensor  # a scalar buffer: one row
    for start in range(0, tensor.shape[0], CHUNK_ROWS):
        chunk = tensor[start : start + CHUNK_ROWS].contiguous()
        digest.update(chunk.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (what ``sha256sum`` prints)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def shift_rows(embedding: torch.Tensor, base: torch.Tensor, sign: int) -> torch.Tensor:
    """``embedding`` with ``sign * base`` added to its first ``len(base)`` rows, in float64, rounded once.

    Args:
        embedding: ``(V, H)`` weights in their stored dtype.
        base: ``(V0, H)`` LLaMA rows, ``V0 <= V``, any float dtype.
        sign: +1 to release, -1 to restore.
    """
    out = embedding.clone()
    for start in range(0, base.shape[0], CHUNK_ROWS):
        end = min(start + CHUNK_ROWS, base.shape[0])
        total = embedding[start:end].double() + sign * base[start:end].double()  # (rows, H) float64
        out[start:end] = total.to(embedding.dtype)
    return out


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(_BITS[tensor.element_size()])


def _base_sha256(base: torch.Tensor) -> str:
    """Checksum of LLaMA's rows as float32, so Meta's fp16 file and an fp32 HF conversion of it agree."""
    return tensor_sha256(base.float())


def _read_manifest(model_dir: Path) -> dict | None:
    path = model_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _check_shapes(embedding: torch.Tensor, base: torch.Tensor, where: str, llama_where: str) -> int:
    if embedding.ndim != 2 or base.ndim != 2 or embedding.shape[1] != base.shape[1]:
        raise ReleaseError(
            f"{where} has shape {tuple(embedding.shape)} but the LLaMA embedding {llama_where} has "
            f"{tuple(base.shape)}: the hidden sizes differ (wrong LLaMA model size?)"
        )
    if base.shape[0] > embedding.shape[0]:
        raise ReleaseError(f"{where} has {embedding.shape[0]} rows, fewer than the {base.shape[0]} of {llama_where}")
    if not embedding.is_floating_point():
        raise ReleaseError(f"{where} is {embedding.dtype}, not a float tensor")
    return base.shape[0]


def _check_untied(model_dir: Path) -> None:
    config = model_dir / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("tie_word_embeddings"):
        raise ReleaseError(
            f"{config}: tie_word_embeddings is true, so lm_head shares the input embedding and would change too; "
            "the release format keeps lm_head as trained"
        )


def _out_dir(out_dir: str | os.PathLike, *inputs: Path) -> Path:
    out = Path(out_dir)
    if out.exists():
        raise ReleaseError(f"op.out_dir={out} already exists: choose a new directory (inputs are never modified)")
    for path in inputs:
        if out.resolve() == path.resolve() or path.resolve() in out.resolve().parents:
            raise ReleaseError(f"op.out_dir={out} is inside the input {path}: choose a directory outside it")
    return out


def _write_directory(
    model_dir: Path,
    out: Path,
    shard: Path,
    shard_contents: tuple[dict[str, torch.Tensor], dict[str, str] | None],
    manifest: dict,
    residual: torch.Tensor | None,
    link: bool,
) -> dict:
    """Copy (or hard-link) ``model_dir`` to ``out`` with ``shard`` rewritten; assembled in ``<out>.tmp``, renamed.

    ``shard_contents`` is ``load_shard(shard)`` with the new embedding in place. Returns ``manifest`` completed with
    the checksums of every file written and of the shard's other tensors, as written to ``out/billa_release.json``.
    """
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skip = {shard.resolve(), (model_dir / MANIFEST).resolve(), (model_dir / RESIDUAL).resolve()}
    for path in sorted(model_dir.rglob("*")):
        target = tmp / path.relative_to(model_dir)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        elif path.resolve() not in skip:
            _copy_file(path, target, link)
    tensors, metadata = shard_contents
    save_shard(tmp / shard.relative_to(model_dir), tensors, metadata)
    if residual is not None:
        save_file({"residual": residual}, str(tmp / RESIDUAL), metadata={"format": FORMAT})
    manifest = {
        **manifest,
        "files": _directory_files(tmp),
        "shard_tensors_sha256": {name: tensor_sha256(t) for name, t in sorted(tensors.items()) if name != HF_EMBED},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out)
    return manifest


def _directory_files(directory: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file under ``directory`` except the manifest, by POSIX path relative to it."""
    files = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and name != MANIFEST:
            files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def _copy_file(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system: copy instead
            pass
    shutil.copy2(src, dst)


def release(
    model: str | os.PathLike,
    llama: str | os.PathLike,
    out_dir: str | os.PathLike,
    exact: bool = True,
    link: bool = False,
) -> dict:
    """Write the release of ``model``: its first LLaMA-vocabulary rows become trained + original LLaMA.

    Args:
        model: the trained HF model directory (any sharding, ``.safetensors`` or ``.bin``).
        llama: Meta's ``consolidated.00.pth`` (or its directory) or a HF LLaMA directory.
        out_dir: the new release directory (must not exist).
        exact: also write the residual file that makes ``restore`` bit-exact.
        link: hard-link unchanged files instead of copying them (same file system only).

    Returns:
        The manifest written to ``out_dir/billa_release.json`` plus ``out_dir``.

    Raises:
        LayoutError: a weight file is missing or truncated (the message names it).
        ReleaseError: already released, tied embeddings, shapes that do not fit LLaMA's, or an existing ``out_dir``.
    """
    model_dir = Path(model)
    shard = tensor_file(model_dir, HF_EMBED, "op.model")
    where = f"op.model={model_dir} ({shard.name}: {HF_EMBED})"
    previous = _read_manifest(model_dir)
    if previous and previous.get("state") == "released":
        raise ReleaseError(f"{where}: already released ({MANIFEST} says so): release the restored weights instead")
    _check_untied(model_dir)
    for path in weight_files(model_dir):  # a truncated shard would be published, checksum and all
        check_readable(path)
    tensors, metadata = load_shard(shard)
    trained = tensors[HF_EMBED]
    base, llama_where = load_llama_embedding(llama)
    rows = _check_shapes(trained, base, where, llama_where)
    out = _out_dir(out_dir, model_dir)
    released = shift_rows(trained, base, +1)
    plain = shift_rows(released, base, -1)  # what a restore by subtraction alone gives back
    residual = _bits(trained[:rows]) ^ _bits(plain[:rows])  # (rows, H): 0 where plain subtraction is exact
    differing = int(residual.count_nonzero())
    manifest = {
        "format": FORMAT,
        "state": "released",
        "tensor": HF_EMBED,
        "file": str(shard.relative_to(model_dir)),
        "shape": list(trained.shape),
        "dtype": str(trained.dtype).removeprefix("torch."),
        "llama_rows": rows,
        "trained_sha256": tensor_sha256(trained),
        "released_sha256": tensor_sha256(released),
        "plain_restore_sha256": tensor_sha256(plain),
        "llama_sha256": _base_sha256(base[:rows]),
        "elements_inexact_without_residual": differing,
        "residual": RESIDUAL if exact and differing else None,
    }
    tensors[HF_EMBED] = released
    manifest = _write_directory(
        model_dir, out, shard, (tensors, metadata), manifest, residual if manifest["residual"] else None, link
    )
    log.info(
        "Released %s -> %s: rows 0..%d of %s += %s; %d of %d elements need the residual for a bit-exact restore",
        model_dir, out, rows - 1, HF_EMBED, llama_where, differing, residual.numel(),
    )  # fmt: skip
    return {**manifest, "out_dir": str(out)}


def _check_released(manifest: dict, released: torch.Tensor, where: str) -> None:
    """Refuse a restore whose input is not the tensor ``release`` wrote, naming the likely cause."""
    if manifest.get("state") == "restored":
        raise ReleaseError(f"{where}: already restored ({MANIFEST} says so); restoring twice subtracts LLaMA again")
    dtype = str(released.dtype).removeprefix("torch.")
    if dtype != manifest["dtype"]:
        raise ReleaseError(
            f"{where}: wrong dtype: the stored embedding is {dtype} but was released as {manifest['dtype']} "
            f"(converted after release?); restore the files as released, or cast them back to {manifest['dtype']}"
        )
    if list(released.shape) != manifest["shape"]:
        raise ReleaseError(f"{where}: shape {list(released.shape)}, but {MANIFEST} records {manifest['shape']}")
    sha = tensor_sha256(released)
    if sha == manifest["trained_sha256"]:
        raise ReleaseError(f"{where}: already restored: the embedding matches the trained checksum in {MANIFEST}")
    if sha != manifest["released_sha256"]:
        raise ReleaseError(
            f"{where}: the embedding is not the one released (SHA-256 {sha[:16]}..., {MANIFEST} records "
            f"{manifest['released_sha256'][:16]}...): modified after release, e.g. restored in place by another script"
        )


def _check_format(manifest: dict, where: str) -> None:
    if manifest.get("format") == FORMAT:
        return
    if manifest.get("format") not in OLD_FORMATS:
        raise ReleaseError(f"{where}: {MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    log.warning(
        "%s: %s is %s and records only the embedding's checksum: the other files are not checked "
        "(restore, then release again with this billa to record them)",
        where, MANIFEST, manifest["format"],
    )  # fmt: skip


def _check_files(model_dir: Path, manifest: dict) -> list[str]:
    """Check the size and SHA-256 of every file the manifest lists except the embedding's (see ``_check_shard``).

    A missing residual is let through (``restore`` then says the result is within rounding). Returns the files on
    disk the manifest does not list (added after the release, e.g. a README: reported, not refused).
    """
    listed = manifest.get("files", {})
    state = manifest.get("state", "released")
    for name, record in listed.items():
        path = model_dir / name
        if name == manifest["file"] or (name == manifest.get("residual") and not path.exists()):
            continue
        if not path.is_file():
            raise ReleaseError(
                f"{path}: missing: {MANIFEST} lists it ({record['bytes']} bytes); copy it from the {state} directory "
                "as published, or download it again"
            )
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ReleaseError(
                f"{path}: {size} bytes, but {MANIFEST} records {record['bytes']} for it (truncated or incomplete "
                "download or copy?); download or copy it again"
            )
        sha = file_sha256(path)
        if sha != record["sha256"]:
            raise ReleaseError(
                f"{path}: modified: SHA-256 {sha[:16]}..., but {MANIFEST} records {record['sha256'][:16]}... for it "
                f"(edited or replaced after the {state} directory was written); download or copy it again"
            )
    on_disk = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    unlisted = sorted(on_disk - set(listed) - {MANIFEST}) if listed else []
    if unlisted:
        log.warning("%s: files %s are not in %s (added later?): not checked", model_dir, unlisted, MANIFEST)
    return unlisted


def _check_shard(manifest: dict, shard: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Check the other tensors of the embedding's file (the embedding itself is checked against its own checksums).

    The whole file's SHA-256 settles it when it matches; otherwise (the embedding is in the other state, or another
    tensor changed) each other tensor is compared with ``shard_tensors_sha256``.
    """
    expected = manifest.get("shard_tensors_sha256")
    record = manifest.get("files", {}).get(manifest["file"])
    if expected is None or (record is not None and file_sha256(shard) == record["sha256"]):
        return
    others = {k: v for k, v in (tensors if tensors is not None else load_shard(shard)[0]).items() if k != HF_EMBED}
    if set(others) != set(expected):
        added, lacking = sorted(set(others) - set(expected)), sorted(set(expected) - set(others))
        raise ReleaseError(
            f"{shard}: holds tensors {added} and lacks {lacking} compared with {MANIFEST} (rewritten by another "
            "tool?); download or copy it again"
        )
    for name in sorted(expected):
        sha = tensor_sha256(others[name])
        if sha != expected[name]:
            raise ReleaseError(
                f"{shard}: tensor {name!r} modified: SHA-256 {sha[:16]}..., but {MANIFEST} records "
                f"{expected[name][:16]}... for it; download or copy the file again"
            )


def _check_llama(manifest: dict, base: torch.Tensor, llama: str | os.PathLike, llama_where: str) -> None:
    if base.shape[0] != manifest["llama_rows"] or _base_sha256(base) != manifest["llama_sha256"]:
        raise ReleaseError(
            f"op.llama={llama}: wrong LLaMA weights: {llama_where} ({base.shape[0]} rows) is not the embedding this "
            f"directory was released with ({manifest['llama_rows']} rows, SHA-256 {manifest['llama_sha256'][:16]}... "
            "as float32); pass the original LLaMA weights the release used"
        )


def _apply_residual(model_dir: Path, manifest: dict, restored: torch.Tensor) -> bool:
    """XOR the residual into the first rows of ``restored`` (in place); False when the residual file is missing."""
    if not manifest.get("residual"):
        return True
    path = model_dir / manifest["residual"]
    if not path.is_file():
        return False
    rows = manifest["llama_rows"]
    head = _bits(restored[:rows]) ^ load_file(str(path))["residual"]
    restored[:rows] = head.view(restored.dtype)
    return True


def restore(
    model: str | os.PathLike,
    llama: str | os.PathLike,
    out_dir: str | os.PathLike,
    link: bool = False,
    require_manifest: bool = True,
) -> dict:
    """Write the trained weights back from a release: subtract LLaMA's rows, check the manifest's SHA-256.

    Args:
        model: the released HF directory (with ``billa_release.json``).
        llama: the same LLaMA weights the release used (Meta ``consolidated.00.pth`` or a HF directory).
        out_dir: the new restored directory (must not exist).
        link: hard-link unchanged files instead of copying them.
        require_manifest: false restores a directory released without a manifest (e.g. BiLLa's own release),
            unverified: the result's checksum is recorded but nothing proves it is right.

    Raises:
        ReleaseError: wrong LLaMA weights, wrong dtype, already restored, or a file whose checksum does not match
            (named).
        LayoutError: a weight file that cannot be read (truncated; named).
    """
    model_dir = Path(model)
    shard = tensor_file(model_dir, HF_EMBED, "op.model")
    where = f"op.model={model_dir} ({shard.name}: {HF_EMBED})"
    manifest = _read_manifest(model_dir)
    if manifest is not None:
        _check_format(manifest, where)
        _check_files(model_dir, manifest)
    tensors, metadata = load_shard(shard)
    released = tensors[HF_EMBED]
    if manifest is not None:
        _check_released(manifest, released, where)
        _check_shard(manifest, shard, tensors)
    elif require_manifest:
        raise ReleaseError(
            f"{where}: no {MANIFEST}, so the restore cannot be checked (not written by billa's release, or already "
            "restored by another tool); pass op.require_manifest=false to restore it unverified"
        )
    base, llama_where = load_llama_embedding(llama)
    rows = _check_shapes(released, base, where, llama_where)
    if manifest is not None:
        _check_llama(manifest, base, llama, llama_where)
    out = _out_dir(out_dir, model_dir, Path(llama))
    restored = shift_rows(released, base, -1)
    state = {"state": "restored", "restored_from": str(model_dir), "llama": llama_where}
    if manifest is None:
        state.update(verified=False, trained_sha256=tensor_sha256(restored))
        log.warning("%s: restored without a manifest: nothing checks that the LLaMA weights were right", where)
    else:
        complete = _apply_residual(model_dir, manifest, restored)
        sha = tensor_sha256(restored)
        if sha == manifest["trained_sha256"]:
            state.update(verified=True, bit_exact=True)
        elif not complete and sha == manifest["plain_restore_sha256"]:
            state.update(verified=True, bit_exact=False)
            log.warning(
                "%s: %s is missing, so %d elements differ from the trained weights by rounding (LLaMA verified)",
                where, manifest["residual"], manifest["elements_inexact_without_residual"],
            )  # fmt: skip
        else:
            raise ReleaseError(
                f"{where}: the restored embedding's SHA-256 {sha[:16]}... does not match the trained checksum "
                f"{manifest['trained_sha256'][:16]}... (damaged {manifest['residual']}?); nothing was written"
            )
    out_manifest = {**(manifest or {"format": FORMAT, "tensor": HF_EMBED, "llama_rows": rows}), **state}
    out_manifest["format"] = FORMAT  # the restored directory's file checksums are recorded in any case
    out_manifest["file"] = str(shard.relative_to(model_dir))
    tensors[HF_EMBED] = restored
    out_manifest = _write_directory(model_dir, out, shard, (tensors, metadata), out_manifest, None, link)
    log.info("Restored %s -> %s (%s)", model_dir, out, "bit-exact" if state.get("bit_exact") else "unverified")
    return {**out_manifest, "out_dir": str(out)}


def verify(model: str | os.PathLike, llama: str | os.PathLike | None = None) -> dict:
    """Report whether ``model`` holds released or restored weights, after checking every file the manifest lists.

    With a manifest, every listed file must have its recorded size and SHA-256 (the embedding's file: every other
    tensor in it), the stored embedding's SHA-256 decides the state, and ``llama``, when given, must be the
    release's LLaMA. Without one, ``llama`` is needed and the answer is an estimate: a released embedding is near
    trained + LLaMA, i.e. closer to twice LLaMA's rows than to LLaMA's rows, a restored one the other way round.

    Raises:
        ReleaseError: a file that differs from the manifest (named), an embedding that matches neither checksum,
            a ``llama`` that is not the release's, or no manifest and no ``llama``.
        LayoutError: a weight file that cannot be read (truncated; named).
    """
    model_dir = Path(model)
    shard = tensor_file(model_dir, HF_EMBED, "op.model")
    where = f"op.model={model_dir} ({shard.name}: {HF_EMBED})"
    manifest = _read_manifest(model_dir)
    if manifest is None:
        result = _estimate_state(read_tensor(shard, HF_EMBED), llama, where)
    else:
        _check_format(manifest, where)
        unlisted = _check_files(model_dir, manifest)
        result = _verify_checksums(manifest, read_tensor(shard, HF_EMBED), where)
        _check_shard(manifest, shard)
        result.update(files_checked=len(manifest.get("files", {})), unlisted_files=unlisted)
        residual = manifest.get("residual")
        if residual and result["state"] == "released" and not (model_dir / residual).exists():
            result["verdict"] += f"; {residual} is missing, so a restore will be within rounding, not bit-exact"
        if llama is not None:
            base, llama_where = load_llama_embedding(llama)
            _check_llama(manifest, base, llama, llama_where)
            result["llama_matches"] = True
    log.info("%s: %s", where, result["verdict"])
    return {"model": str(model_dir), **result}


def _verify_checksums(manifest: dict, embedding: torch.Tensor, where: str) -> dict:
    sha = tensor_sha256(embedding)
    states = {
        manifest.get("released_sha256"): ("released", "released (checksum matches the release)"),
        manifest.get("trained_sha256"): ("restored", "restored (bit-exact: checksum matches the trained weights)"),
        manifest.get("plain_restore_sha256"): ("restored", "restored within rounding (no residual applied)"),
    }
    if sha not in states:
        raise ReleaseError(
            f"{where}: modified: SHA-256 {sha[:16]}... matches neither the released nor the trained checksum in "
            f"{MANIFEST} (dtype {str(embedding.dtype).removeprefix('torch.')}, released as {manifest.get('dtype')})"
        )
    state, verdict = states[sha]
    if state != manifest.get("state"):
        verdict += f", although {MANIFEST} says {manifest.get('state')} (files mixed from two directories?)"
    return {"state": state, "checksum_ok": True, "verdict": verdict}


def _estimate_state(embedding: torch.Tensor, llama: str | os.PathLike | None, where: str) -> dict:
    if llama is None:
        raise ReleaseError(f"{where}: no {MANIFEST}: pass op.llama=<LLaMA weights> to estimate the state")
    base, _ = load_llama_embedding(llama)
    rows = _check_shapes(embedding, base, where, str(llama))
    head, base = embedding[:rows].double(), base.double()
    to_llama = (head - base).norm().item()  # small when restored (trained stays near LLaMA, or independent of it)
    to_double = (head - 2 * base).norm().item()  # small when released (trained + LLaMA)
    state = "released" if to_double < to_llama else "restored"
    return {
        "state": state,
        "checksum_ok": None,
        "distance_to_llama": to_llama,
        "distance_to_twice_llama": to_double,
        "verdict": f"probably {state} (no {MANIFEST}; |E - L| = {to_llama:.4g}, |E - 2L| = {to_double:.4g})",
    }


__all__ = [
    "LayoutError",
    "ReleaseError",
    "file_sha256",
    "release",
    "restore",
    "verify",
    "shift_rows",
    "tensor_sha256",
]
