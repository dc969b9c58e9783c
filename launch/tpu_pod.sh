#!/usr/bin/env bash
# Train md4_jax on a Cloud TPU pod slice: every worker runs the same command; JAX's
# multi-controller runtime connects them (jax.distributed.initialize auto-detects TPU pods).
#
#   TPU_NAME=md4-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 \
#   WORKDIR=gs://my-bucket/md4/owt launch/tpu_pod.sh --config=configs/openwebtext.py \
#       --config.data_dir=gs://my-bucket/data/openwebtext
#
# Steps: create the slice (skipped if it exists), copy this repository to every worker,
# install it, then start training on all workers at once. Re-running resumes from the latest
# checkpoint in $WORKDIR (a GCS path, so every worker sees it).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs://...)}"
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
fi

tar -czf /tmp/md4_jax_src.tgz -C "$REPO_DIR" --exclude=.git --exclude=.venv --exclude=.ci-venv .
gcloud compute tpus tpu-vm scp /tmp/md4_jax_src.tgz "$TPU_NAME":~/ --worker=all --zone="$ZONE" $PROJECT_FLAG
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone="$ZONE" $PROJECT_FLAG --command="
  set -e
  mkdir -p ~/md4_jax && tar -xzf ~/md4_jax_src.tgz -C ~/md4_jax
  cd ~/md4_jax
  python3 -m venv ~/md4_venv && source ~/md4_venv/bin/activate
  pip install -q -U pip && pip install -q -e . && pip install -q -U 'jax[tpu]'
  python -m md4_jax.train --distributed --workdir=$WORKDIR $*
"
