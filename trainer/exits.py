"""Exit statuses of the trainer, its launcher and the Kubernetes jobs, with what each one means.

The rendered PyTorchJobs use the Kubeflow training operator's `restartPolicy: ExitCode`: a pod that exits
1-127 failed permanently and is not restarted, one that exits 128-255 is restarted (`IsRetryableExitCode` in
pkg/util/train/train_util.go of kubeflow/training-operator v1.9.0: `exitCode >= 128`). So every failure that a
restart cannot cure must exit below 128, and every infrastructure fault at or above it:

    0     success
    1     a rank crashed (uncaught exception) and crashes are not retried: permanent
    2     the user's input is wrong (config, recipe, dataset, S3 credentials/bucket/prefix): permanent
    3     the run crashed run.crash_restarts+1 starts in a row from the same checkpoint without progress
          (trainer/crash_budget.py: the start after them refuses before training): permanent
    128+N the process got signal N (143: SIGTERM from a pod deletion, eviction or preemption): retried
    200   infrastructure fault or unknown cause (storage outage, a rank killed by a signal such as the OOM
          killer's, a failed rendezvous): retried
    201   a rank crashed and GNP_RETRY_CRASHES=1 asked for crashes to be retried (NCCL timeout, lost peer)

`python -m trainer`, `python -m trainer.launch` (what docker/entrypoint.sh runs) and k8s/render.py (the
conversion Job's podFailurePolicy) all take these values from here.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CRASH = 1  # what Python exits with on an uncaught exception
EXIT_USER = 2  # argparse's own status for bad arguments, and the trainer's for every user error
EXIT_CRASH_LOOP = 3  # a crash budget spent without progress (trainer/crash_budget.py)
EXIT_RETRYABLE = 200
EXIT_RETRY_CRASH = 201
# Kubeflow's ExitCode policy: statuses from here up are retried, those below are permanent.
FIRST_RETRIED = 128


def signal_status(signum: int) -> int:
    """The status a shell reports for a process ended by signal `signum` (and the one to exit with after it)."""
    return FIRST_RETRIED + int(signum)


def is_retried(status: int) -> bool:
    """Whether the operator restarts a pod that exited with `status` (never for 0: success)."""
    return status >= FIRST_RETRIED
