#!/usr/bin/env bash
# One machine, all local devices (CPU, one or more GPUs):
#   bash launch/local.sh train configs/msf_256.py runs/base --config.stage=base
set -euo pipefail
MODE=${1:?usage: local.sh MODE CONFIG WORKDIR [extra flags]}
CONFIG=${2:?config}
WORKDIR=${3:?workdir}
shift 3
python3 -m msf_jax.main --mode="$MODE" --config="$CONFIG" --workdir="$WORKDIR" "$@"
