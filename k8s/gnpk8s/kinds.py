"""The job kinds: one module per kind, the protocol each one implements, and the registry KINDS.

A kind is a module (pytorchjob.py, trainjob.py, convert.py) with the five operations of JobKind below (render, submit,
status, logs, delete) plus `build` (the job object), `rank0_pod` and `follow_up`, and the constants that name
its API. Adding a kind is one module and one line in KINDS: render, submit, status, logs and delete (the CLI,
the make targets) and the Kueue check find it here, and tests/test_k8s_kinds.py checks every registered kind
against its CRD (a built-in kind such as batch/v1 with kubernetes-validate --strict). The spec key `api` (and
the CLI's --api, make's API=) names the kind.

The dataset-conversion Job (convert.py, kind `convert`) is a kind too: `make submit|status|logs|delete JOB=<spec>
API=convert` (its NAME is the training job's, the Job is NAME-convert); `render --part convert` still prints
it whatever the spec's api, for kubectl.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, Protocol, cast

from . import convert, kueue, pytorchjob, trainjob
from .cluster import Cluster
from .errors import UserError
from .spec import JobSpec


class JobKind(Protocol):
    """What a job-kind module provides (a structural type: the modules themselves satisfy it)."""

    NAME: str  # the spec's `api` and the CLI's --api
    GROUP: str
    VERSION: str
    PLURAL: str
    KIND: str
    MAKE_API: str  # what `make status|logs|delete` need to name this kind ("" for the default kind)
    KUEUE_FRAMEWORK: str  # Kueue's integrations.frameworks name of the kind
    KUEUE_HINT: str  # appended to the error when Kueue made no Workload ("" for none)

    def build(self, spec: JobSpec) -> dict:
        """The job object."""

    def render(self, spec: JobSpec) -> list[dict]:
        """Every object submit creates, in order (the job object last)."""

    def rank0_pod(self, obj: dict) -> str:
        """The pod (or label selector) of global rank 0."""

    def submit(self, job: JobSpec, cluster: Cluster) -> dict:
        """Create the job's objects after the checks that keep pods from holding GPUs idle; the created job."""

    def status(self, cluster: Cluster, name: str) -> str:
        """A short report: state, Kueue, waiting pods, progress, restarts, last failure, conditions, pods."""

    def logs(
        self,
        cluster: Cluster,
        name: str,
        follow: bool = True,
        wait_s: float = 120,
        out: Any = None,
        rank: int | None = None,
        previous: bool = False,
    ) -> None:
        """Print or stream the log of node/worker `rank` (rank 0's pod by default; the previous container's with
        previous=True), saying what it waits for, for at most wait_s."""

    def delete(self, cluster: Cluster, name: str) -> None:
        """Delete the job and what submit made for it."""

    def follow_up(self, name: str, namespace: str) -> str:
        """The commands to watch a submitted job."""


KINDS: dict[str, ModuleType] = {"pytorchjob": pytorchjob, "trainjob": trainjob, "convert": convert}
OPERATIONS = ("render", "submit", "status", "logs", "delete")


def get(api: str, where: str = "") -> JobKind:
    """The kind named `api`; UserError naming the known kinds (as a spec key's error when `where` names the
    spec file)."""
    if api not in KINDS:
        if where:
            raise UserError(f"{where}: api: expected one of {', '.join(KINDS)}, got {api!r}")
        raise UserError(f"unknown job kind {api!r}; known: {', '.join(KINDS)}")
    return cast(JobKind, KINDS[api])


def submit(job: JobSpec, cluster: Cluster, wait_s: float | None = None) -> dict:
    """Create the job with its kind's submit; with a Kueue queue, wait up to wait_s (default
    kueue.DEFAULT_WAIT_S) for Kueue's Workload and stop with the fix when none appears."""
    kind = get(job.api, job.where)
    job.namespace = job.namespace or cluster.namespace
    cluster.namespace = job.namespace
    created = kind.submit(job, cluster)
    if job.scheduling.queue:
        uid = created.get("metadata", {}).get("uid", "")
        wait = kueue.DEFAULT_WAIT_S if wait_s is None else wait_s
        wl = kueue.wait_for_workload(cluster, kind, job.name, uid, wait)
        if wl:
            print(f"queued: Kueue Workload {wl} in LocalQueue {job.scheduling.queue}", file=sys.stderr)
    return created
