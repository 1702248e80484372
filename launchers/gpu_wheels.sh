#!/usr/bin/env bash
# Fills launchers/gpu_wheels/ (git-ignored) with what launchers/gpu_check.sh installs on a bare GPU machine that has no
# network: Linux x86_64 wheels for CPython 3.12 of the packages such a machine lacks, a bitsandbytes wheel cut down
# to its CPU and CUDA 13 libraries (43 MB -> ~4 MB), and SmolLM2's tokenizer files (the tiny test models' vocabulary).
# Run it where PyPI and the embedded SmolLM2 are reachable (this repository's dev venv):
#   bash launchers/gpu_wheels.sh [PYTHON]          # PYTHON: a python with pip (default: python3)
# The folder must stay under the carried budget (64 MiB with the working tree): pyarrow (55 MB) and pandas (12 MB),
# which datasets and so trl need, are fetched only with WITH_ARROW=1 and are otherwise expected on the machine
# (gpu_check.sh then trains; without them it runs everything but the DPO step).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
out="$here/gpu_wheels"
py="${1:-python3}"
budget_mb=56  # of the 64 MiB a device call carries: the working tree itself takes the rest

# The versions this repository is tested with (pyproject.toml, the dev venv).
small=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 xxhash==4.1.0 multiprocess==0.70.19 hydra-core==1.3.8
       omegaconf==2.3.1 gguf==0.19.0 psutil==7.2.2 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
       pytest-timeout==2.4.0)
arrow=(pyarrow==26.0.1 pandas==3.1.1)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)

rm -rf "$out"
mkdir -p "$out/tokenizer"
download() {
    "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$out" "$@"
}
download "${small[@]}"
if [[ "${WITH_ARROW:-0}" == 1 ]]; then
    download "${arrow[@]}"
fi
# hydra-core's antlr4 runtime is published as a source archive only: build its (pure Python) wheel here.
"$py" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$out" antlr4-python3-runtime==4.9.3

# bitsandbytes 0.50.2 ships one library per CUDA and ROCm version: keep the CPU one and CUDA 13's (torch 2.11 cu13).
download bitsandbytes==0.50.2
"$py" - "$out" <<'PY'
import base64, hashlib, pathlib, re, sys, zipfile

folder = pathlib.Path(sys.argv[1])
wheel = next(folder.glob("bitsandbytes-*.whl"))
keep = re.compile(r"bitsandbytes/libbitsandbytes_(cpu|cuda13\d)\.so$")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    names = [n for n in src.namelist() if not (n.endswith(".so") and not keep.search(n))]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    lines = []
    for name in names:
        if name == record:
            continue
        data = src.read(name)
        dst.writestr(src.getinfo(name), data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    dst.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
slim.replace(wheel)
PY

# SmolLM2's tokenizer (tests/conftest.py reads $EXPERTCHAT_TEST_TOKENIZER where the embedded models are missing).
PYTHONPATH="$root" HF_HUB_OFFLINE=1 "$py" - "$out/tokenizer" <<'PY'
import sys

from expertchat.engine.models import load_tokenizer
from tests.conftest import smollm2_config

load_tokenizer(smollm2_config()).save_pretrained(sys.argv[1])
PY

size_mb=$(du -sm "$out" | cut -f1)
echo "launchers/gpu_wheels: ${size_mb} MB ($(find "$out" -name '*.whl' | wc -l) wheels + tokenizer)"
if (( size_mb > budget_mb )); then
    echo "launchers/gpu_wheels: ${size_mb} MB is over the ${budget_mb} MB budget" >&2
    exit 1
fi
