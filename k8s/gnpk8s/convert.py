"""The batch/v1 Job that writes a JobSpec's FFCV dataset (its `convert:` section)."""

from __future__ import annotations

from .errors import EXIT_USER
from .pod import (
    container_security,
    ephemeral_storage,
    job_labels,
    meta,
    pod_security,
    queue_labels,
    resources,
    s3_env,
    scheduling_fields,
)
from .spec import JobSpec, require_image


def build(spec: JobSpec) -> dict | None:
    """The conversion Job (None if the spec has no convert section).

    It runs on CPU nodes: no GPU toleration or GPU node selector. It gets S3 credentials only when it reads
    (convert.source_s3) or writes (dataset.s3) S3. A dataset PVC is mounted read-write here (this Job writes
    it), so the claim must allow a writer: ReadWriteOnce / ReadWriteMany, not ReadOnlyMany.
    """
    cv = spec.convert
    if cv is None:
        return None
    name = f"{spec.name}-convert"[:63].rstrip("-")
    env = [{"name": "GNP_JOB_NAME", "value": spec.name}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": cv.resources.tmp}}]
    args = ["convert", "--dataset", cv.dataset]
    if spec.dataset.pvc:
        out = spec.data_path  # the last --set data.path wins, as in the training pods
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": spec.dataset.pvc}})
        mounts.append({"name": "data", "mountPath": "/data"})
    else:
        out = "/tmp/gnp-convert-out"  # then uploaded to the dataset's S3 prefix by the entrypoint
        env.append({"name": "GNP_DATA_S3", "value": spec.dataset.s3})
    if cv.source_s3:
        env.append({"name": "GNP_CONVERT_SOURCE_S3", "value": cv.source_s3})
    elif cv.source:
        args += ["--source", cv.source]
    args += ["--out", out, *cv.args]
    if cv.source_s3 or spec.dataset.s3:
        env += s3_env(spec)
    container = {
        "name": "convert",
        "image": require_image(spec),
        "imagePullPolicy": spec.pull_policy,
        "args": args,
        "env": env,
        "resources": resources(cv.resources, scratch=ephemeral_storage(cv.resources.tmp)),
        "securityContext": container_security(),
        "volumeMounts": mounts,
    }
    labels = job_labels(spec, "dataset-conversion")
    # The queue label only, no `suspend: true`: this Job is applied with kubectl, not by submit (which checks
    # that Kueue made a Workload), and Kueue's batch/job integration (on by default) suspends a labelled Job
    # in its webhook; a Job suspended here by hand would wait forever on a cluster whose Kueue skips Jobs.
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta(name, spec.namespace, {**labels, **queue_labels(spec, training=False)}),
        "spec": {
            "backoffLimit": 2,
            "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
            # exit 2 = bad arguments or source data: retrying cannot help
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "convert", "operator": "In", "values": [EXIT_USER]},
                    }
                ]
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security(),
                    **scheduling_fields(spec, training=False),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
