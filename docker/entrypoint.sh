#!/usr/bin/env bash
# Container entrypoint of the GNP trainer image.
#
#   [train] --recipe NAME [--set k=v ...]   torchrun -m trainer train ... (the default mode)
#   convert --dataset D --out DIR [...]      python -m trainer convert ...; then upload DIR to $GNP_DATA_S3 if set
#   help                                     this text
#   anything else                            exec'd as a command (e.g. `bash`, `python -m trainer recipes`)
#
# train and convert exec `python -m trainer.launch` (trainer/launch.py), which does the same outside a container.
# torchrun gets no --nnodes/--node_rank/--master_*/--rdzv_* flags: it reads them from the PET_* variables
# that the Kubeflow training operator injects (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT,
# PET_NPROC_PER_NODE, PET_RDZV_*, PET_MAX_RESTARTS). Outside Kubernetes, set PET_NPROC_PER_NODE yourself.
#
# Exit status (what Kubeflow's `restartPolicy: ExitCode` sees: 1-127 permanent, 128-255 retried):
#   0        training finished
#   2        a rank exited 2: bad config, unknown recipe, bad or missing dataset -> permanent, never retried
#            (also: a permanent S3 problem with the dataset: no credentials, access denied, no such bucket,
#            nothing under the prefix)
#   3        crash loop: the run crashed run.crash_restarts+1 starts in a row from the same checkpoint
#            without progress, so this start refused before training (trainer/crash_budget.py) -> permanent
#   128+N    this container got signal N (143: SIGTERM from a pod deletion, eviction or preemption)
#   1        a rank crashed (uncaught exception) and GNP_RETRY_CRASHES is not 1 -> permanent
#   201      a rank crashed and GNP_RETRY_CRASHES=1 (NCCL timeout, lost peer, CUDA error, or a bug) -> retried
#   200      torchrun failed and no rank crashed: a rank exited >= 128 (200: storage outage), a rank was
#            killed by a signal (OOM killer), or the rendezvous/agent failed; or an S3 transfer failed
#            for another reason -> retried
# Why not torchrun's own status: on any rank failure torchrun raises ChildFailedError and exits 1, which
# would make a preemption of a peer permanent and hide the trainer's 2. So each rank runs through a small
# shim (`python -m trainer.launch rank`) that records its exit status in $GNP_STATUS_DIR/exit.<restart>.<local_rank>,
# and the launcher maps the statuses of torchrun's last restart attempt as above.
#
# Environment: GNP_PYTHON (python to use, default `python`), GNP_MODULE (module the ranks run, default
# `trainer`), GNP_RETRY_CRASHES (0|1, default 0), GNP_CRASH_RESTARTS (run.crash_restarts' default, an integer
# >= 0; default 3), GNP_DATA_S3 + GNP_DATA_DIR (train: download the FFCV
# dataset under that s3:// prefix into GNP_DATA_DIR first; convert: upload the output there afterwards),
# GNP_CONVERT_SOURCE_S3 (convert: download this s3:// object or prefix and pass it as --source),
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL_S3 (S3 access).
set -uo pipefail

PY=${GNP_PYTHON:-python}

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

# exec, not a child: the launcher becomes PID 1 and gets the pod's SIGTERM itself (it traps SIGTERM/SIGINT,
# which PID 1 would otherwise ignore, passes SIGTERM on to torchrun and exits 128+N).
case "${1:-help}" in
    help|-h|--help) usage ;;
    train|convert) exec "$PY" -m trainer.launch "$@" ;;
    -*) exec "$PY" -m trainer.launch train "$@" ;;
    *) exec "$@" ;;
esac
