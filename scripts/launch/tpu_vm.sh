#!/bin/bash
# gptjax on a Cloud TPU VM slice: the same command on every worker; JAX finds the other workers.
# The workdir must be storage every worker sees (e.g. a Filestore/NFS or GCS FUSE mount).
# Rendered by scripts/launch/render.py; run from a machine with gcloud configured.
set -euo pipefail
gcloud compute tpus tpu-vm ssh "${tpu_name}" --zone="${zone}" --worker=all --command="\
cd ${repo_dir} && \
python3 scripts/train.py --config=${config} --workdir=${workdir} ${overrides}"
