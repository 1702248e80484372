#!/usr/bin/env bash
# The GPU check (issue 20): on a bare single-GPU machine with Python 3.12, torch (CUDA), transformers, accelerate,
# peft and sentence-transformers preinstalled and NO network, install what is missing from the wheels carried in
# launchers/gpu_wheels/ (made beforehand by launchers/gpu_wheels.sh, git-ignored: carry it), run the gpu test tier
# (tests/test_gpu.py) and a timed smoke run on tiny random models, and print the GPU, the versions and the figures.
# Ends within 8 minutes (each step has its own time limit). From the repository root:
#   bash launchers/gpu_check.sh            # logs and figures also go to $OUT when it is set
# Exit status: 0 when the tier and the smoke run pass, 1 otherwise; every step's outcome is printed either way.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
root="$PWD"
wheels="$root/launchers/gpu_wheels"
venv="$root/.gpu_venv"  # git-ignored: what this script installs and writes
logs="${OUT:-$venv/out}"
deadline=$((SECONDS + 470))  # 8 minutes less a margin for the summary
status=0
mkdir -p "$logs"

say() { printf '[gpu_check %3ds] %s\n' "$SECONDS" "$*"; }
left() { echo $((deadline - SECONDS)); }
limit() {  # limit SECONDS CMD...: run CMD for at most SECONDS (and never past the deadline)
    local cap=$1
    shift
    local t
    t=$(left)
    (( t > cap )) && t=$cap
    if (( t < 10 )); then
        say "no time left for: $*"
        return 124
    fi
    timeout --kill-after=10 "$t" "$@"
}

say "machine: $(uname -srm), $(nproc) CPUs, python $(python3 --version 2>&1 | cut -d' ' -f2)"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null \
    | sed 's/^/[gpu_check] GPU: /' || say "nvidia-smi: not found"
[[ -d "$wheels" ]] || { say "launchers/gpu_wheels/ is missing: run launchers/gpu_wheels.sh and carry the folder"; exit 1; }

# Missing packages go into a folder on PYTHONPATH (no venv: python3-venv may be absent), without their dependencies
# (pip --target would reinstall torch): each package's own dependencies are listed here, and imports are checked.
site="$venv/site"
mkdir -p "$site"
export PYTHONPATH="$root:$site"
py=python3
pip=("$py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --find-links "$wheels" \
     --target "$site" --upgrade)
missing=()
for pkg in bitsandbytes:bitsandbytes psutil:psutil gguf:gguf pytest:pytest pluggy:pluggy iniconfig:iniconfig \
           pytest-timeout:pytest_timeout; do
    "$py" -c "import ${pkg#*:}" 2>/dev/null || missing+=("${pkg%%:*}")
done
# hydra and omegaconf as one set with the antlr4 runtime they were generated with (4.9; a newer one on the machine
# fails with "Could not deserialize ATN with version 3 (expected 4)")
"$py" -c "import hydra, omegaconf; omegaconf.OmegaConf.create({'a': '\${b}', 'b': 1}).a" 2>/dev/null \
    || missing+=(hydra-core omegaconf antlr4-python3-runtime)
if (( ${#missing[@]} )); then
    say "installing ${missing[*]}"
    limit 120 "${pip[@]}" "${missing[@]}" || { say "installing ${missing[*]} failed"; status=1; }
fi
# trl needs datasets, and datasets pyarrow (55 MB) and pandas (12 MB): over the carried budget unless preinstalled
# (or carried: launchers/gpu_wheels.sh with WITH_ARROW=1 on a larger budget).
if ! "$py" -c "import trl" 2>/dev/null; then
    training=()
    for pkg in trl:trl datasets:datasets dill:dill xxhash:xxhash multiprocess:multiprocess pyarrow:pyarrow \
               pandas:pandas; do
        "$py" -c "import ${pkg#*:}" 2>/dev/null || training+=("${pkg%%:*}")
    done
    limit 120 "${pip[@]}" "${training[@]}" 2>"$logs/pip_trl.err"
    if "$py" -c "import trl.experimental.online_dpo" 2>"$logs/import_trl.err"; then
        say "installed ${training[*]}"
    else
        say "trl not usable ($(tail -n1 "$logs/pip_trl.err" "$logs/import_trl.err" | grep -v '^==' | grep . | tail -n1));" \
            "the tier skips the DPO settings and the smoke run trains 0 steps"
        rm -rf "$site"/trl "$site"/trl-*  # a half-installed trl would fail imports instead of being skipped
    fi
fi
"$py" - <<'PY' 2>&1 | sed 's/^/[gpu_check] /'
import importlib, torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 1e9:.1f} GB, compute capability {p.major}.{p.minor}, "
          f"bf16 native: {torch.cuda.is_bf16_supported(including_emulation=False)}")
for name in ("transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes", "hydra", "sentence_transformers"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # noqa: BLE001 - a report line, not a failure
        print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")
PY

if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "torch sees no CUDA GPU: the gpu tier would only skip"
    status=1
fi

# The wheel carries bitsandbytes' CUDA 13.0 and 13.2 libraries: another CUDA 13 minor of torch uses 13.0's.
cuda=$("$py" -c "import torch; print((torch.version.cuda or '').replace('.', ''))" 2>/dev/null)
bnb_dir=$("$py" -c "import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))" 2>/dev/null)
if [[ -n "$cuda" && -n "$bnb_dir" && ! -e "$bnb_dir/libbitsandbytes_cuda$cuda.so" && "$cuda" == 13* ]]; then
    export BNB_CUDA_VERSION=130
    say "torch CUDA $cuda: bitsandbytes uses its CUDA 13.0 library (BNB_CUDA_VERSION=130)"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 WANDB_MODE=disabled
export TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false EXPERTCHAT_CACHE="$venv/cache"
export EXPERTCHAT_TEST_TOKENIZER="$wheels/tokenizer" EXPERTCHAT_GPU_FIGURES="$logs/gpu_figures.jsonl"
rm -f "$EXPERTCHAT_GPU_FIGURES"

say "gpu tier: pytest -m gpu tests/test_gpu.py"
if limit 300 "$py" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider >"$logs/gpu_tier.log" 2>&1; then
    say "gpu tier: passed"
else
    say "gpu tier: FAILED (exit $?)"
    status=1
fi
tail -n 25 "$logs/gpu_tier.log"

say "timed smoke run: tiny Mixtral (nf4, the plan's device map) vs tiny Llama"
smoke="$venv/smoke"
rm -rf "$smoke"
limit 60 "$py" - "$smoke" <<'PY' || status=1
import os, sys
from pathlib import Path
from expertchat.config.schema import ModelConfig
from expertchat.engine.models import load_tokenizer
from tests.conftest import make_tiny_model, save_tiny_mixtral
out = Path(sys.argv[1])
tokenizer = load_tokenizer(ModelConfig(name="tok", path=os.environ["EXPERTCHAT_TEST_TOKENIZER"]))
save_tiny_mixtral(tokenizer, out / "mixtral")
make_tiny_model(tokenizer, seed=1).save_pretrained(out / "llama")
tokenizer.save_pretrained(out / "llama")
PY
steps=0
"$py" -c "import trl" 2>/dev/null && steps=1
gpu_gb=$("$py" -c "import torch; print(f'{torch.cuda.get_device_properties(0).total_memory / 1e9:.2f}')" 2>/dev/null)
cc=$("$py" -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability(0))))" 2>/dev/null)
start=$SECONDS
if limit 150 "$py" -m expertchat +experiment=smoke "hydra.run.dir=$smoke/run" reward=rating_only \
        "training.steps=$steps" hardware.name=this_gpu hardware.gpus=1 "hardware.gpu_memory_gb=${gpu_gb:-0}" \
        "hardware.compute_capability=${cc:-0}" "actor.path=$smoke/mixtral" actor.package=null actor.gguf_file=null \
        actor.name=tiny_mixtral actor.load_in_4bit=true actor.device_map=auto "judge.path=$smoke/llama" \
        judge.package=null judge.gguf_file=null judge.name=tiny_llama \
        "training.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,w1,w2,w3]" >"$logs/smoke.log" 2>&1; then
    say "smoke run: passed in $((SECONDS - start)) s (training steps: $steps)"
else
    say "smoke run: FAILED (exit $?) after $((SECONDS - start)) s"
    status=1
fi
tail -n 15 "$logs/smoke.log"
cp -f "$smoke/run/status.json" "$logs/smoke_status.json" 2>/dev/null || true

say "figures ($EXPERTCHAT_GPU_FIGURES):"
cat "$EXPERTCHAT_GPU_FIGURES" 2>/dev/null || say "no figures written"
say "done: $([[ $status == 0 ]] && echo passed || echo FAILED), ${SECONDS} s"
exit "$status"
