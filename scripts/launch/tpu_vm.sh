#!/bin/bash
# gptjax on a Cloud TPU VM slice: the same command on every worker; JAX finds the other workers.
# The workdir must be storage every worker sees (e.g. a Filestore/NFS or GCS FUSE mount).
# LIBTPU_INIT_ARGS: the recommended TPU flags (gptjax/xla_flags.py, README "Accelerators"), unless
# the workers' environment sets it (then scripts/train.py adds the flags it lacks).
# Rendered by scripts/launch/render.py; run from a machine with gcloud configured.
set -euo pipefail
gcloud compute tpus tpu-vm ssh "${tpu_name}" --zone="${zone}" --worker=all --command="\
cd ${repo_dir} && \
${libtpu_prefix}python3 scripts/train.py --config=${config} --workdir=${workdir} ${overrides}"
