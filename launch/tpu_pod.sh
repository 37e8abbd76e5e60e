#!/usr/bin/env bash
# Train one MSF stage on a Cloud TPU pod slice: the same command runs on every worker.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=/mnt/gcs/msf_base STAGE=base \
#     EXTRA="--config.data.cache_dir=/mnt/gcs/latents" bash launch/tpu_pod.sh
# WORKDIR and the latent cache must be a path every worker sees (a GCS FUSE or NFS mount).
# Each worker reads its own shard of the latent cache; jax.distributed.initialize() is automatic on TPU.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
STAGE=${STAGE:-base}
CONFIG=${CONFIG:-configs/msf_256.py}
EXTRA=${EXTRA:-}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd ~/msf_jax || { git clone \"${REPO_URL:?set REPO_URL}\" ~/msf_jax && cd ~/msf_jax; }
  python3 -m pip install -q -e '.[tpu]'
  python3 -m msf_jax.main --mode=train --config=$CONFIG --config.stage=$STAGE --workdir=$WORKDIR $EXTRA
"
