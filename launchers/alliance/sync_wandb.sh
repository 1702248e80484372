#!/usr/bin/env bash
# Upload offline W&B runs from a LOGIN node (compute nodes have no internet; jobs log with WANDB_MODE=offline into
# <run folder>/wandb/offline-run-*). Every run folder under the given paths (default: $EXPERTCHAT_SWEEPS and
# $EXPERTCHAT_OUTPUTS, which launchers/alliance/env.sh puts on scratch; else multirun/ outputs/):
#   bash launchers/alliance/sync_wandb.sh [PATH ...]        (wandb login once first, or WANDB_API_KEY in the env)
# A run that was already synced is skipped by wandb (its .synced marker); --dry-run lists what would be sent.
set -euo pipefail
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
roots=("$@")
[ ${#roots[@]} -gt 0 ] || roots=("${EXPERTCHAT_SWEEPS:-multirun}" "${EXPERTCHAT_OUTPUTS:-outputs}")
mapfile -t runs < <(find "${roots[@]}" -type d -name 'offline-run-*' -path '*/wandb/*' 2>/dev/null | sort)
if [ ${#runs[@]} -eq 0 ]; then echo "sync_wandb: no offline W&B runs under ${roots[*]}"; exit 0; fi
echo "sync_wandb: ${#runs[@]} offline run(s)"
wandb sync --skip-synced "${dry[@]}" "${runs[@]}"
