#!/usr/bin/env bash
# Download, into .whl/ at the repository root, exactly the Python wheels that the GPU machine
# (an H200: Python 3.12, torch 2.11, torchaudio 2.11, no package registry) lacks for
# benchmarks/device/check.sh, then print their total size. Run it here, where PyPI is reachable:
#
#   bash benchmarks/device/fetch_wheels.sh
#
# .whl/ is git-ignored (never commit it); it goes to the GPU machine with the code, and check.sh installs
# it with pip --no-index --no-deps --target /tmp/site. Every wheel is downloaded with --no-deps, so
# each needed dependency is named below, one version each (two versions of one package stop the
# whole install there). The versions are the ones this project is tested with here.
#
# Already on the GPU machine, so NOT fetched: torch, torchaudio,
# torchvision, numpy, scipy, scikit-learn, matplotlib, pillow, tqdm, einops, accelerate, pyyaml,
# packaging, typing-extensions, filelock, regex, requests, safetensors, huggingface-hub (1.33 there:
# diffusers 0.42 needs >=1.32), numba, torch-geometric, tensorboard.
#
# Left out on purpose:
# * rdkit (about 35 MB): imported only inside the molecule domain's data loading, metrics and
#   outputs (domains/molecule/{data,metrics,outputs}.py, all lazily). check.sh touches molecules
#   only through benchmarks/bench_egnn.py, which builds synthetic QM9-sized batches and never
#   loads, scores or writes molecules, so the device run does not need it.
# * importlib-metadata: diffusers lists it, but imports the standard library's importlib.metadata
#   on Python >= 3.8.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEST=.whl

# name==version: pure-Python wheels (py3-none-any) unless noted.
WHEELS=(
  hydra-core==1.3.8                 # polydiff's recipes (compose, train)
  omegaconf==2.3.1                  # hydra-core, polydiff.build
  soundfile==0.14.0                 # domains/audio/io.py: the shipped FLAC clips; manylinux_2_28, bundles libsndfile
  cffi==2.0.0                       # soundfile (cp312 manylinux2014 wheel)
  pycparser==3.0                    # cffi
  diffusers==0.42.1                 # bench_unet's UNet2DModel peer (and the suite's scheduler peers)
  denoising-diffusion-pytorch==2.3.4  # bench_unet's Unet1D peer (its package imports accelerate, ema_pytorch, pytorch_fid)
  ema-pytorch==0.8.3                # denoising-diffusion-pytorch
  pytorch-fid==0.3.0                # denoising-diffusion-pytorch (imported at package import; no weights are loaded)
  egnn-pytorch==0.2.8               # bench_egnn's peer
)
# antlr4-python3-runtime 4.9.3 (hydra-core and omegaconf pin 4.9.*) is published as a source
# archive only: build its pure-Python wheel here (pip wheel; nothing is installed).
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
"$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DEST" "${SDIST_ONLY[@]}"

n_expected=$(( ${#WHEELS[@]} + ${#SDIST_ONLY[@]} ))
n_got=$(ls "$DEST"/*.whl | wc -l)
if [ "$n_got" -ne "$n_expected" ]; then
  echo "fetch_wheels: expected $n_expected wheels in $DEST, found $n_got:" >&2
  ls "$DEST" >&2
  exit 1
fi
echo "wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $NF}'
whl_bytes=$(cat "$DEST"/*.whl | wc -c)
tracked_bytes=$(git ls-files -z | xargs -0 cat 2>/dev/null | wc -c)
untracked_bytes=$(git ls-files -z --others --exclude-standard | xargs -0 -r cat 2>/dev/null | wc -c)
awk -v w="$whl_bytes" -v t="$tracked_bytes" -v u="$untracked_bytes" 'BEGIN {
  printf "total of the wheels: %.2f MiB\n", w / 1048576
  printf "travelling tree with them: %.2f MiB (tracked %.2f + untracked-not-ignored %.2f + .whl %.2f; the limit is 64 MiB)\n",
         (w + t + u) / 1048576, t / 1048576, u / 1048576, w / 1048576 }'
