#!/usr/bin/env bash
# README's first command: set up, pretrain every registered task on the embedded data with the tiny
# smoke configuration, export the trunk, and print where everything is.
source "$(dirname "$0")/scripts/setup.sh"
RUN_DIR="${RUN_DIR:-runs/smoke}"
EXPORT_DIR="${EXPORT_DIR:-exports/smoke}"
.venv/bin/python -m tf_mtssl.pretrain --flagfile=flags/smoke.cfg --tasks=all --model_dir="$RUN_DIR"
.venv/bin/python -m tf_mtssl.export_saved_model --model_dir="$RUN_DIR" --export_dir="$EXPORT_DIR"
echo
echo "TensorBoard logs: $(realpath "$RUN_DIR")/train   (tensorboard --logdir $RUN_DIR)"
echo "Checkpoints:      $(realpath "$RUN_DIR")"
echo "Export:           $(realpath "$EXPORT_DIR")"
exit 0
