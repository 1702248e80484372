# Source in every Beluga shell that submits or runs ExpertChat jobs:   source launchers/beluga/env.sh
# Personal settings (account, paths) go in launchers/beluga/local.env (git-ignored), e.g.
#   export SLURM_ACCOUNT=def-yourpi
#   export MIXTRAL_PATH=$HOME/projects/def-yourpi/models/Mixtral-8x7B-Instruct-v0.1
#   export LLAMA3_8B_PATH=$HOME/projects/def-yourpi/models/Meta-Llama-3-8B-Instruct
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ -f "$here/local.env" ] && source "$here/local.env"
export EXPERTCHAT_VENV=${EXPERTCHAT_VENV:-$HOME/envs/expertchat}
export HF_HOME=${HF_HOME:-$HOME/scratch/hf}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
if [ -x "$EXPERTCHAT_VENV/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ]; then source "$EXPERTCHAT_VENV/bin/activate"; fi
