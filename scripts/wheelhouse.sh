#!/usr/bin/env bash
# Wheels of everything billa needs beyond torch, for a machine that reaches no package index (a GPU machine that has
# torch, lightning and transformers but not hydra, deepspeed, datasets, wandb or openai):
#
#   scripts/wheelhouse.sh DIR [--have FILE] [--python-version X.Y]
#   python3 -m pip install --no-index --find-links DIR -e .     # on the target, in the repository root
#
# The set is billa's dependencies (pyproject.toml) and theirs, at the versions installed in $PYTHON (default
# python3: the environment billa is tested in), plus setuptools and wheel (the build of `-e .`). Never included:
# torch and what only torch needs (triton, nvidia-*). --have FILE: names (one a line, `pip freeze` lines too) the
# target already has; they and their own dependencies are left out, which keeps DIR small enough to travel with the
# working tree (scripts/gpu_image.txt: the GPU machines' image). --python-version: the target's Python (default:
# $PYTHON's); binary wheels are fetched for it (manylinux x86-64), packages published only as source distributions
# (deepspeed, antlr4) are built here into pure-Python wheels. Prints what DIR holds and its size.
set -euo pipefail
dir="${1:?usage: scripts/wheelhouse.sh DIR [--have FILE] [--python-version X.Y]}"
shift
have=""
pyver=""
while [ $# -gt 0 ]; do
  case $1 in
    --have) have="$2"; shift 2 ;;
    --python-version) pyver="$2"; shift 2 ;;
    *) echo "billa: error: unknown option $1 (--have FILE, --python-version X.Y)" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python3}"
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "$have" ] && [ ! -f "$have" ]; then
  echo "billa: error: --have $have: no such file (names of the packages the target has, one a line)" >&2
  exit 2
fi
mkdir -p "$dir"
pyver="${pyver:-$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"

# name==version of every package to bring, from the installed metadata of $python
pins=$("$python" - "$root/pyproject.toml" "$have" "$pyver" <<'EOF'
import importlib.metadata as md
import re
import sys
import tomllib

from packaging.requirements import Requirement

pyproject, have_file, pyver = sys.argv[1:4]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


skip = {"torch", "triton"}  # torch comes first, as its CUDA build (README); never in the wheelhouse
if have_file:
    for line in open(have_file):
        line = line.split("#")[0].strip()
        if line:
            skip.add(norm(re.split(r"[=<>~!@ ;\[]", line, maxsplit=1)[0]))
env = {"python_version": pyver, "python_full_version": pyver + ".0"}
todo = [(Requirement(r), "") for r in tomllib.load(open(pyproject, "rb"))["project"]["dependencies"]]
pins = {"setuptools": ">=68", "wheel": ""}  # `pip install -e .` builds in isolation: setuptools and wheel from DIR
seen, missing = set(), []
while todo:  # (requirement, the extra of the package that asked for it)
    req, extra = todo.pop()
    name = norm(req.name)
    if name in skip or name.startswith("nvidia-") or (req.marker and not req.marker.evaluate({**env, "extra": extra})):
        continue
    wanted = {""} | set(req.extras)  # fsspec[http]: fsspec's own requirements and those of its extra "http"
    if {(name, e) for e in wanted} <= seen:
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(str(req))
        continue
    pins.setdefault(name, f"=={version}")
    for e in wanted - {x for n, x in seen if n == name}:
        seen.add((name, e))
        todo.extend((Requirement(r), e) for r in md.requires(req.name) or [])
if missing:
    sys.exit(f"billa: error: not installed in {sys.executable}, so their versions are unknown: {missing}. Run "
             "with PYTHON=<the python billa is installed in> (.venv/bin/python)")
print("\n".join(f"{name}{spec}" for name, spec in sorted(pins.items())))
EOF
)
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
  manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
built=()
for pin in $pins; do
  if ! "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${platforms[@]}" -d "$dir" "$pin" 2>/dev/null; then
    # only a source distribution: build it here (--no-build-isolation: deepspeed's setup imports torch)
    DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$pin"
    built+=("$pin")
  fi
done
printf '%s\n' $pins >"$dir/requirements.txt"
echo "wheelhouse $dir for Python $pyver: $(echo "$pins" | wc -w) packages${have:+ (left out: those in $have)}"
echo "built here from source: ${built[*]:-none}"
ls "$dir" | grep -v requirements.txt | sed 's/^/  /'
echo "size: $(du -sh "$dir" | cut -f1) ($(du -sb "$dir" | cut -f1) bytes)"
