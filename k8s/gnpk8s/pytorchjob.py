"""The kubeflow.org/v1 PyTorchJob of a JobSpec, for the Kubeflow training operator v1.9.

Layout: Workers only, always with an `elasticPolicy` (c10d rendezvous on worker-0; min = max pods for a
fixed-size job). Why not Master + Workers: for a job with a Master the v1.9 operator injects an
`init-pytorch` container into every Worker pod (pkg/controller.v1/pytorch/initcontainer.go at v1.9.0: an
alpine image that loops on `nslookup <job>-master-0`, with resources but no securityContext), which a
namespace enforcing the `restricted` Pod Security Standard refuses and an air-gapped cluster cannot pull.
With no Master replica the operator injects nothing. The elasticPolicy is also what makes the operator set
PET_MAX_RESTARTS (pkg/controller.v1/pytorch/envvar_elastic.go), so `max_restarts` holds for every job.

What a loss does (c10d keeps its store inside worker-0's agent):
  - a Worker other than worker-0 lost: the other agents re-form the group (elastic jobs go on with fewer
    pods down to min_nodes; fixed-size jobs wait for the recreated pod), every rank restarts from the last
    checkpoint, and the recreated pod joins at the next rendezvous;
  - worker-0 lost: the store is gone, every other agent exits within seconds with a retried status (200 for
    the RendezvousConnectionError, or 201 when its rank's collective failed first; both retried under
    `restartPolicy: ExitCode`), the operator recreates the pods and the job resumes from its last
    checkpoint. tests/test_elastic_drill.py runs both with two real agents.
"""

from __future__ import annotations

import copy

from .pod import job_labels, meta, pod_template, queue_labels
from .spec import JobSpec

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
OPERATOR_INSTALL = (
    "kubectl apply --server-side -k "
    '"github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.9.0"'
)


def run_policy(spec: JobSpec) -> dict:
    """runPolicy: restarts, clean-up, deadline, and how a shared cluster queues and gangs the job."""
    # backoffLimit only counts restarts of running pods; ExitCode recreates pods instead, so
    # activeDeadlineSeconds is the bound that always holds (training-operator v1.9.0,
    # pkg/controller.v1/common/job.go: pastBackoffLimit counts container restarts of OnFailure/Always pods).
    # cleanPodPolicy Running: when the job ends, pods still running (agents waiting on a dead rendezvous)
    # are deleted; finished pods stay for their logs until the TTL.
    out: dict = {
        "cleanPodPolicy": "Running",
        "backoffLimit": spec.backoff_limit,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
    }
    if spec.active_deadline_seconds is not None:
        out["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.scheduling.queue:
        # Kueue's PyTorchJob integration admits a job by un-suspending it (kubernetes-sigs/kueue
        # pkg/controller/jobs/kubeflow/kubeflowjob: IsSuspended/Suspend read runPolicy.suspend); created
        # suspended, no pod exists before admission even if Kueue's webhook is not in the path.
        out["suspend"] = True
    sch = spec.scheduling
    if sch.gang:
        # The operator, started with --gang-scheduler-name=volcano|scheduler-plugins, creates a PodGroup from
        # this (pkg/controller.v1/common/job.go at v1.9.0); minAvailable = every pod, so none starts alone.
        sp: dict = {"minAvailable": spec.nodes}
        if sch.gang_queue:
            sp["queue"] = sch.gang_queue
        if sch.priority_class:
            sp["priorityClass"] = sch.priority_class
        out["schedulingPolicy"] = sp
    return out


def elastic_policy(spec: JobSpec) -> dict:
    lo, hi = spec.elastic or (spec.nodes, spec.nodes)
    # nProcPerNode inside elasticPolicy is deprecated in v1.9: spec.nprocPerNode carries it.
    return {"rdzvBackend": "c10d", "minReplicas": lo, "maxReplicas": hi, "maxRestarts": spec.max_restarts}


def build(spec: JobSpec) -> dict:
    """The PyTorchJob object (validates against the v1.9 CRD and its webhook rules)."""
    replica = {"replicas": spec.nodes, "restartPolicy": "ExitCode", "template": copy.deepcopy(pod_template(spec))}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": meta(spec.name, spec.namespace, {**job_labels(spec), **queue_labels(spec)}),
        "spec": {
            "nprocPerNode": str(spec.nproc),
            "runPolicy": run_policy(spec),
            "elasticPolicy": elastic_policy(spec),
            "pytorchReplicaSpecs": {"Worker": replica},
        },
    }


def rank0_pod(obj: dict) -> str:
    """Pod of global rank 0: worker-0 (master-0 for a job created with a Master by an older renderer)."""
    name = obj["metadata"]["name"]
    specs = obj.get("spec", {}).get("pytorchReplicaSpecs", {})
    return f"{name}-master-0" if "Master" in specs else f"{name}-worker-0"
