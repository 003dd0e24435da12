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
conversion Job's podFailurePolicy) all take these values from here. The documents' exit-status table is
`python -m trainer.exits` (the rows of STATUSES; a test compares the two).
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


# The exit-status table of the documents: (status, who exits with it, what it means, what Kubernetes does).
# Under a PyTorchJob the operator's ExitCode policy retries >= 128; under a TrainJob the rendered
# podFailurePolicy fails the job on 1-127 and the JobSet restarts on the rest (up to the spec's backoff_limit).
STATUSES: tuple[tuple[str, str, str, str], ...] = (
    (str(EXIT_OK), "trainer", "success", "done"),
    (str(EXIT_CRASH), "launcher", "a rank crashed (uncaught exception) and crashes are not retried", "permanent"),
    (
        str(EXIT_USER),
        "trainer, launcher, k8s tools",
        "wrong input: config, recipe, dataset, S3 URI/credentials/bucket; one line names the key or file",
        "permanent",
    ),
    (
        str(EXIT_CRASH_LOOP),
        "trainer (rank 0 at start)",
        "crash loop: `run.crash_restarts`+1 starts in a row crashed from the same checkpoint (spec key "
        "`crash_restarts`); raise it or delete the run's starts.json to go on",
        "permanent",
    ),
    (
        f"{FIRST_RETRIED}+N (143)",
        "launcher",
        "the launcher got signal N: 143 = SIGTERM from a pod deletion, eviction or preemption",
        "retried",
    ),
    (
        str(EXIT_RETRYABLE),
        "launcher, trainer",
        "infrastructure fault or unknown cause: storage outage, a rank killed by a signal (OOM killer), failed "
        "rendezvous, a final checkpoint that does not verify",
        "retried",
    ),
    (
        str(EXIT_RETRY_CRASH),
        "launcher",
        "a rank crashed and the spec's `retry_crashes: true` (GNP_RETRY_CRASHES=1) asks for a retry (NCCL timeout, "
        "lost peer); bounded by the crash budget (3)",
        "retried",
    ),
)


def markdown_table() -> str:
    """The exit-status table in Markdown (what `python -m trainer.exits` prints)."""
    lines = ["| Status | Exited by | Meaning | On Kubernetes |", "| --- | --- | --- | --- |"]
    lines += [f"| {status} | {who} | {meaning} | {action} |" for status, who, meaning, action in STATUSES]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown_table())
