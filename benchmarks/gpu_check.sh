#!/usr/bin/env bash
# phf beside the references on one GPU, in one command (at most about 8 minutes on an H100/H200):
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--out FILE] [--device cuda] [--quick] [--skip NAMES]
#
# On a machine that has torch (CUDA) and transformers (and accelerate, which transformers' Trainer needs), it
#   1. installs what phf's command line imports and the machine lacks (pycodestyle, sentencex, zstandard, ...), each
#      at the version of constraints.txt, without dependencies, and lists them; from the wheels in DIR (--wheels or
#      $PHF_WHEELS, e.g. made elsewhere with `pip download -d DIR --no-deps pycodestyle==... sentencex==...
#      zstandard==...`), else from the package index;
#   2. runs phf from this checkout (PYTHONPATH, nothing installed in editable mode): `phf bench train --device` and
#      `phf bench sample --device`, each under a time limit that keeps what finished;
#   3. writes one JSON (--out, default gpu_check.json) and prints the table of tokens/s, MFU, peak memory and phf's
#      ratio to each reference.
# `--device cpu --quick` runs the same code on a tiny shape on a CPU, in about a minute: the check that this script
# still works where there is no GPU.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
wheels="${PHF_WHEELS:-}"
out="gpu_check.json"
device="cuda"
quick=""
skip=""
train_limit=230   # seconds: five training contenders, two of which compile
sample_limit=240  # seconds: the samplers, each in a process of its own with its budget (90, 75, 20, 20, 20)
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --quick) quick="--quick"; shift ;;
    --skip) skip="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$root"

# 1. what phf imports and this machine lacks: import, install the missing module's package, again (never torch or
#    transformers: the machine's own builds are what is measured)
"$python" -c "import torch, transformers" 2>/dev/null || {
  echo "gpu_check: $python lacks torch or transformers; install the machine's CUDA build of torch and transformers first" >&2
  exit 2
}
installed=()
for _ in $(seq 12); do
  missing="$("$python" - <<'EOF'
import importlib
try:
    for module in ("phf.cli.main", "benchmarks.paper_train", "benchmarks.paper_sample", "accelerate"):
        importlib.import_module(module)
except ModuleNotFoundError as exc:
    print(exc.name.split(".")[0])
EOF
)"
  [ -z "$missing" ] && break
  package="$(case "$missing" in yaml) echo PyYAML ;; sklearn) echo scikit-learn ;; *) echo "$missing" ;; esac)"
  pinned="$(grep -i "^${package//_/[-_]}==" constraints.txt || echo "$package")"
  case " ${installed[*]:-} " in *" $pinned "*) echo "gpu_check: $pinned was installed but $missing still does not import" >&2; exit 1 ;; esac
  echo "gpu_check: installing $pinned (phf imports $missing)"
  if [ -n "$wheels" ]; then
    "$python" -m pip install --quiet --no-deps --no-index --find-links "$wheels" "$pinned"
  else
    "$python" -m pip install --quiet --no-deps "$pinned"
  fi
  installed+=("$pinned")
done
echo "gpu_check: installed ${installed[*]:-nothing}; phf runs from $root"

# 2. the benchmarks, each writing its figures after every contender (a time limit keeps what finished)
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
status=0
timeout "$train_limit" "$python" -m phf bench train --device "$device" $quick --skip "$skip" \
  --out "$scratch/train.json" > /dev/null || { status=$?; echo "gpu_check: the training benchmark ended with status $status" >&2; }
timeout "$sample_limit" "$python" -m phf bench sample --device "$device" $quick --skip "$skip" \
  --out "$scratch/sample.json" > /dev/null || { status=$?; echo "gpu_check: the sampling benchmark ended with status $status" >&2; }

# 3. one JSON, one table
"$python" - "$scratch/train.json" "$scratch/sample.json" "$out" "${installed[*]:-}" <<'EOF'
import json, sys
from pathlib import Path
from benchmarks.paper_shape import format_ratios
from phf.core.io import write_json
figures = {}
for path in sys.argv[1:3]:
    if Path(path).exists():
        figures.update(json.loads(Path(path).read_text()))
if "machine" not in figures:
    sys.exit("gpu_check: neither benchmark wrote figures; see the messages above")
figures["installed"] = sys.argv[4].split()
write_json(Path(sys.argv[3]), figures)
print(format_ratios(figures))
print(f"figures: {sys.argv[3]}")
EOF
exit "$status"
