"""`make status` and `make logs` (issue 29) against the fake API server (tests/support/kube_fake.py): every state
a job on a shared cluster is in, with the exact lines the CLI prints.

- queued: Suspended, with Kueue's Workload and its QuotaReserved=False message;
- unschedulable / pulling: Pending from the pods' phases (not the job's conditions: JobSet counts pending pods
  as active), with each pending pod's PodScheduled=False or container-waiting reason;
- running: progress, ETA, loss and top-1 (PyTorchJob: the last `progress` line of rank 0's log; TrainJob:
  status.trainerStatus);
- crash-looping: restarts and the last failure (exit 201, its meaning from trainer/exits.py, the log tail);
- finished;
- make logs: the reason it waits for, once per change, a bounded wait ending in one error line and status 2,
  RANK and PREVIOUS.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest

from gnpk8s.cli import main
from tests.support.kube_fake import FakeKube, pod_terminated, pod_unschedulable, pod_waiting
from tests.support.kube_fake_kueue import FakeKueue
from tests.test_k8s import TEST_IMAGE
from trainer.exits import STATUSES

ALL_FRAMEWORKS = ("batch/job", "kubeflow.org/pytorchjob", "trainer.kubeflow.org/trainjob")
T_2H = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2, minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
T_1H = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1, minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
UNSCHED = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available."
QUOTA = (
    "couldn't assign flavors to pod set node: insufficient quota for nvidia.com/gpu in flavor default-flavor, "
    "previously considered podsets requests (0) + current podset request (8) > maximum capacity (4)"
)
RESTARTS = {
    "pytorchjob": "pods recreated, from the last hour's events, + container restarts",
    "trainjob": "JobSet restart attempt of the pods + container restarts",
}
PROGRESS = (
    "progress step=120 total_steps=1000 percent=12 epoch=1.2 eta_s=340 eta=5m40s loss=0.53 top1=0.81 lr=0.1 "
    "images_per_s=900"
)


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("GNP_IMAGE", TEST_IMAGE)
    with FakeKube(kueue=FakeKueue(local_queues={"gnp": []}, frameworks=ALL_FRAMEWORKS)) as server:
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig", namespace="gnp")))
        yield server


def _age_2h(obj) -> None:
    """Every timestamp of the object 2 hours old, so that the printed ages are stable."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("creationTimestamp", "lastTransitionTime", "startTime", "startedAt"):
                obj[k] = T_2H
            else:
                _age_2h(v)
    elif isinstance(obj, list):
        for v in obj:
            _age_2h(v)


def _job(fake, api: str, name: str) -> dict:
    return fake.jobs[("gnp", name)] if api == "pytorchjob" else fake.trainer["trainjobs"][("gnp", name)]


def _pods(fake, name: str) -> list[dict]:
    return [p for (_, n), p in sorted(fake.pods.items()) if n.startswith(name + "-")]


def _status(fake, capsys, api: str, name: str) -> list[str]:
    _age_2h(_job(fake, api, name))
    for p in _pods(fake, name):
        _age_2h(p["metadata"])
    assert main(["status", name, "--api", api]) == 0
    return capsys.readouterr().out.splitlines()


def _submit(capsys, api: str, name: str, *spec: str) -> None:
    args = ["submit", name, "--spec", f"api={api}"]
    for s in spec:
        args += ["--spec", s]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_queued_shows_the_workloads_reason(fake, capsys, api):
    fake.kueue.local_queues = {"gnp": ["team-a"]}
    _submit(capsys, api, "resnet-cifar", "queue=team-a")
    (_, _, wl), *_ = fake.kueue.workloads
    wl["status"] = {
        "conditions": [
            {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": QUOTA},
        ]
    }
    out = _status(fake, capsys, api, "resnet-cifar")
    wl_name = wl["metadata"]["name"]
    assert out[0].startswith(f"{api} gnp/resnet-cifar: Suspended (not admitted by Kueue, or evicted)   (recipe")
    assert out[0].endswith("created 2h ago)")
    assert out[1] == (
        f"kueue: not admitted (workload {wl_name}, queue team-a, position 1 of 1 in the queue, 1 in clusterqueue "
        f"cluster-queue): QuotaReserved=False Pending: {QUOTA}"
    )
    assert out[-2:] == ["pods:", "  (none)"]
    # admitted: the Workload says so, and the job's state comes from its pods again
    wl["status"] = {"conditions": [{"type": "Admitted", "status": "True"}], "admission": {"clusterQueue": "gpu"}}
    assert (
        _status(fake, capsys, api, "resnet-cifar")[1]
        == f"kueue: admitted (workload {wl_name}, queue team-a, clusterqueue gpu)"
    )


QUOTA_FALSE = {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": QUOTA}]}
T_NOW = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
T_3H = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _queued(fake, capsys, api: str = "pytorchjob") -> dict:
    """Submit resnet-cifar to LocalQueue team-a; its Workload, pending for want of quota, created 2 hours ago."""
    fake.kueue.local_queues = {"gnp": ["team-a"], "other": ["team-b", "team-c"]}
    _submit(capsys, api, "resnet-cifar", "queue=team-a")
    (_, _, wl), *_ = fake.kueue.workloads
    wl["status"] = QUOTA_FALSE
    wl["metadata"]["creationTimestamp"] = T_2H
    return wl


def _pending_requests(fake) -> list[str]:
    return [p for m, p in fake.requests if m == "GET" and "/pendingworkloads" in p]


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_queued_shows_its_position_in_the_queue(fake, capsys, api):
    """Kueue's visibility API orders the pending Workloads by priority, then creation (StrictFIFO): one created
    later but of higher priority is ahead, one of the same priority created later is behind; status prints the
    position from 1 (the API counts from 0), in the LocalQueue and in its ClusterQueue."""
    fake.kueue.cluster_queues = {"team-a": "gpu", "team-b": "gpu", "team-c": "cpu"}
    wl = _queued(fake, capsys, api)
    fake.kueue.add_workload("gnp", "ahead-by-priority", "team-a", priority=10, created=T_NOW)
    fake.kueue.add_workload("gnp", "behind", "team-a", priority=0, created=T_1H)
    admitted = fake.kueue.add_workload("gnp", "running", "team-a", priority=100, created=T_2H)
    admitted["status"] = {"conditions": [{"type": "Admitted", "status": "True"}], "admission": {"clusterQueue": "gpu"}}
    # another namespace's LocalQueue feeding ClusterQueue gpu, created before ours: ahead in the ClusterQueue only;
    # one feeding another ClusterQueue counts nowhere
    fake.kueue.add_workload("other", "other-team-first", "team-b", priority=0, created=T_3H)
    fake.kueue.add_workload("other", "other-clusterqueue", "team-c", priority=100, created=T_3H)
    out = _status(fake, capsys, api, "resnet-cifar")
    name = wl["metadata"]["name"]
    assert out[1] == (
        f"kueue: not admitted (workload {name}, queue team-a, position 2 of 3 in the queue, 3 in clusterqueue gpu): "
        f"QuotaReserved=False Pending: {QUOTA}"
    )
    assert _pending_requests(fake) == [
        "/apis/visibility.kueue.x-k8s.io/v1beta1/namespaces/gnp/localqueues/team-a/pendingworkloads?limit=1000&offset=0"
    ]
    # no condition yet: the position still comes
    wl["status"] = {}
    assert _status(fake, capsys, api, "resnet-cifar")[1] == (
        f"kueue: not admitted (workload {name}, queue team-a, position 2 of 3 in the queue, 3 in clusterqueue gpu): "
        "no condition yet"
    )


def test_queue_position_from_visibility_v1beta2(fake, capsys):
    """A Kueue that serves only visibility.kueue.x-k8s.io/v1beta2: v1beta1 answers 404, v1beta2 the position."""
    fake.kueue.visibility_versions = {"v1beta2"}
    wl = _queued(fake, capsys)
    fake.kueue.add_workload("gnp", "ahead", "team-a", priority=1)
    out = _status(fake, capsys, "pytorchjob", "resnet-cifar")
    assert out[1].startswith(
        f"kueue: not admitted (workload {wl['metadata']['name']}, queue team-a, position 2 of 2 in the queue, "
        "2 in clusterqueue cluster-queue): QuotaReserved=False"
    )
    assert [p.split("/")[3] for p in _pending_requests(fake)] == ["v1beta1", "v1beta2"]


NOTES = {
    "absent": "position unknown: Kueue's visibility API is not served",
    "forbidden": (
        "position unknown: forbidden, grant get on localqueues/pendingworkloads (visibility.kueue.x-k8s.io), "
        "see k8s/examples/rbac.yaml"
    ),
    "down": "position unknown: Kueue's visibility API server is down (503)",
    "no-localqueue": "position unknown: Kueue has no LocalQueue team-a",
}


@pytest.mark.parametrize("why", sorted(NOTES))
def test_queue_position_unknown_says_why_and_status_still_works(fake, capsys, why):
    """Without the visibility API (Kueue < 0.6, feature gate VisibilityOnDemand off: 404 on both versions), without
    the RBAC rule (403), with its aggregated server down (503), or the LocalQueue gone, the line is today's plus the
    note; exit 0."""
    if why == "absent":
        fake.kueue.visibility_versions = set()
    elif why == "forbidden":
        fake.kueue.visibility_forbidden = True
    elif why == "down":
        fake.kueue.visibility_down = True
    wl = _queued(fake, capsys)
    if why == "no-localqueue":  # deleted since submit: Kueue's 404 names it, no other version is tried
        fake.kueue.local_queues = {"gnp": []}
    out = _status(fake, capsys, "pytorchjob", "resnet-cifar")  # (asserts exit status 0)
    assert out[1] == (
        f"kueue: not admitted (workload {wl['metadata']['name']}, queue team-a, {NOTES[why]}): "
        f"QuotaReserved=False Pending: {QUOTA}"
    )
    assert len(_pending_requests(fake)) == (2 if why == "absent" else 1)  # absent: v1beta1, then v1beta2


def test_queue_position_beyond_the_first_page(fake, capsys):
    """The visibility API answers one page (limit 1000): a Workload behind 1000 others is `position > 1000`; one
    in a full page is `of 1000 or more`."""
    wl = _queued(fake, capsys)
    for i in range(1000):
        fake.kueue.add_workload("gnp", f"ahead-{i:04d}", "team-a", priority=5, created=T_2H)
    head = f"kueue: not admitted (workload {wl['metadata']['name']}, queue team-a, "
    assert _status(fake, capsys, "pytorchjob", "resnet-cifar")[1].startswith(f"{head}position > 1000 in the queue): ")
    wl["spec"]["priority"] = 6  # now first
    assert _status(fake, capsys, "pytorchjob", "resnet-cifar")[1].startswith(
        f"{head}position 1 of 1000 or more in the queue, 1 in clusterqueue cluster-queue): "
    )


def test_fake_pendingworkloads_answers_kueues_shape_with_limit_and_offset(fake):
    """The fake's visibility API (tests/support/kube_fake_kueue.py): a PendingWorkloadsSummary in StrictFIFO order,
    cut by offset and limit; 404 naming an unknown LocalQueue."""
    import json
    import urllib.error
    import urllib.request

    fake.kueue.local_queues = {"gnp": ["team-a"]}
    for name, prio, created in (("c", 0, T_1H), ("a", 9, T_NOW), ("b", 0, T_2H)):
        fake.kueue.add_workload("gnp", name, "team-a", priority=prio, created=created)
    base = f"{fake.url}/apis/visibility.kueue.x-k8s.io/v1beta1/namespaces/gnp/localqueues"
    with urllib.request.urlopen(f"{base}/team-a/pendingworkloads") as r:
        summary = json.load(r)
    assert (summary["kind"], summary["apiVersion"]) == ("PendingWorkloadsSummary", "visibility.kueue.x-k8s.io/v1beta1")
    assert [(i["metadata"]["name"], i["positionInLocalQueue"], i["priority"]) for i in summary["items"]] == [
        ("a", 0, 9),
        ("b", 1, 0),
        ("c", 2, 0),
    ]
    assert summary["items"][0]["localQueueName"] == "team-a" and summary["items"][0]["positionInClusterQueue"] == 0
    with urllib.request.urlopen(f"{base}/team-a/pendingworkloads?limit=1&offset=1") as r:
        assert [i["metadata"]["name"] for i in json.load(r)["items"]] == ["b"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{base}/nope/pendingworkloads")
    assert e.value.code == 404 and json.load(e.value)["details"]["name"] == "nope"


def test_no_workload_says_kueue_does_not_manage_the_job(fake, capsys):
    fake.kueue.local_queues = {"gnp": ["team-a"]}
    fake.kueue.frameworks = {"batch/job"}
    assert main(["submit", "resnet-cifar", "--spec", "queue=team-a", "--queue-wait", "0"]) == 2
    capsys.readouterr()
    out = _status(fake, capsys, "pytorchjob", "resnet-cifar")
    assert out[1] == "kueue: queue team-a; no Workload for this job: Kueue does not manage it (see make submit's error)"


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_unschedulable_and_image_pull_show_the_pods_reason(fake, capsys, api):
    _submit(capsys, api, "resnet-cifar", "nodes=2")
    first, second = _pods(fake, "resnet-cifar")
    pod_unschedulable(first, UNSCHED)
    pod_waiting(second, "ImagePullBackOff", 'Back-off pulling image "registry.example/gnp:v1"')
    out = _status(fake, capsys, api, "resnet-cifar")
    a, b = (p["metadata"]["name"] for p in (first, second))
    # the job's own conditions say Running (PyTorchJob) or nothing (TrainJob; JobSet counts the pods active)
    assert out[0].startswith(f"{api} gnp/resnet-cifar: Pending (2 of 2 pods pending, 0 running)   (recipe")
    assert out[1:5] == [
        "waiting:",
        f"  {a}: Unschedulable: {UNSCHED}",
        f'  {b}: ImagePullBackOff: Back-off pulling image "registry.example/gnp:v1"',
        f"restarts: 0 ({RESTARTS[api]})",
    ]
    assert not [line for line in out if line.startswith(("progress:", "last failure:"))]


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_running_shows_progress(fake, capsys, api):
    _submit(capsys, api, "resnet-cifar")
    (pod,) = _pods(fake, "resnet-cifar")
    if api == "pytorchjob":
        fake.logs[("gnp", pod["metadata"]["name"])] = f"start\n{PROGRESS.replace('120', '100')}\n{PROGRESS}\nnoise\n"
    else:
        _job(fake, api, "resnet-cifar")["status"]["trainerStatus"] = {
            "progressPercentage": 12,
            "estimatedRemainingSeconds": 340,
            "metrics": [
                {"name": "loss", "value": "0.53"},
                {"name": "top1", "value": "0.81"},
                {"name": "epoch", "value": "1.2"},
                {"name": "step", "value": "120"},
                {"name": "total_steps", "value": "1000"},
            ],
            "lastUpdatedTime": T_1H,
        }
    out = _status(fake, capsys, api, "resnet-cifar")
    source = "resnet-cifar-worker-0 log" if api == "pytorchjob" else "trainerStatus, updated 1h ago"
    assert out[0].startswith(f"{api} gnp/resnet-cifar: Running (1/1 pods running)   (recipe resnet-cifar")
    assert out[1:3] == [
        f"progress: 12% (step 120/1000, epoch 1.2), ETA 5m40s, loss 0.53, top1 0.81   ({source})",
        f"restarts: 0 ({RESTARTS[api]})",
    ]
    if api == "pytorchjob":  # status reads a bounded tail of rank 0's log, never all of it
        assert ("GET", "/api/v1/namespaces/gnp/pods/resnet-cifar-worker-0/log?container=pytorch&tailLines=200") in (
            fake.requests
        )


CRASH_LOG = (
    "progress step=40 total_steps=1000 percent=4\nTraceback (most recent call last):\nRuntimeError: NCCL timeout\n"
)
MEANING_201 = next(m for s, _, m, _ in STATUSES if s == "201")


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_crash_loop_shows_restarts_and_the_last_failure(fake, capsys, api):
    _submit(capsys, api, "resnet-cifar")
    (pod,) = _pods(fake, "resnet-cifar")
    name = pod["metadata"]["name"]
    if api == "pytorchjob":
        # ExitCode policy: the pod failed with a retried status twice, the operator replaced it each time (same
        # name, restartCount 0); now it failed a third time and is not replaced yet
        for _ in range(2):
            pod_terminated(pod, 201, T_1H)
            fake.recreate_pod("gnp", name)
        pod_terminated(pod, 201, T_1H)
        fake.logs[("gnp", name)] = "log line\n" * 10 + CRASH_LOG
        failure, restarts, state = f"{name} exit 201 (Error, 1h ago)", "2", "Restarting (1 pod(s) failed"
    else:
        # the JobSet's third attempt, whose container crashed once already (the previous container's log)
        pod["metadata"]["labels"]["jobset.sigs.k8s.io/restart-attempt"] = "2"
        pod_terminated(pod, 201, T_1H, previous=True, restarts=1)
        fake.previous_logs[("gnp", name)] = "log line\n" * 10 + CRASH_LOG
        failure, restarts, state = f"{name} exit 201 (Error, previous container, 1h ago)", "3", "Running"
    out = _status(fake, capsys, api, "resnet-cifar")
    first = out.index(f"restarts: {restarts} ({RESTARTS[api]})")
    assert out[first + 1 : first + 7] == [
        f"last failure: {failure}: {MEANING_201} [retried]",
        "  | log line",
        "  | log line",
        "  | progress step=40 total_steps=1000 percent=4",
        "  | Traceback (most recent call last):",
        "  | RuntimeError: NCCL timeout",
    ]
    assert "a rank crashed" in MEANING_201
    pods_line = next(line for line in out if line.startswith(f"  {name}"))
    assert pods_line.endswith("exit 201 (Error)") if api == "pytorchjob" else " Running " in pods_line
    assert out[0].startswith(f"{api} gnp/resnet-cifar: {state}")


def _crash_record(unix: float) -> list[dict]:
    """What starts.json holds after a crash of rank 1 at step 6 of a start resumed from step 4 (its traceback tail
    as the launcher keeps it)."""
    lines = ["Traceback (most recent call last):"]
    lines += [f'  File "/app/trainer/train.py", line {n}, in f{n}' for n in range(30)]
    lines += ["RuntimeError: CUDA error: an illegal memory access was encountered"]
    failure = {"exit": 201, "rank": 1, "unix": unix, "lines": lines[-20:]}
    return [{"from": None, "end": None}, {"from": 4, "end": None, "failure": failure}]


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_a_replaced_pod_shows_the_crash_the_run_kept(fake, capsys, api):
    """The operator replaced the crashed pod (its log is gone); the new start's rank 0 printed the crash the run
    kept (trainer/crash_budget.py failure_report) near the top of its log, and status shows it from there."""
    from trainer.crash_budget import failure_report, starts_line

    _submit(capsys, api, "resnet-cifar")
    (pod,) = _pods(fake, "resnet-cifar")
    name = pod["metadata"]["name"]
    unix = time.time() - 600
    record = _crash_record(unix)
    report = failure_report(record)
    record[0]["end"] = "signal"  # the first start was preempted, the second crashed
    record.append({"from": 4, "end": None})  # this start
    filler = [f"startup line {i} " + "x" * 80 for i in range(100)]  # the head is read in bytes, not lines
    fake.logs[("gnp", name)] = "\n".join(["loading", *report, starts_line(record), *filler, PROGRESS]) + "\n"
    out = _status(fake, capsys, api, "resnet-cifar")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))
    at = next(i for i, line in enumerate(out) if line.startswith("last failure:"))
    # the run's own count: 2 starts before this one (its pod is new: the pods and events know nothing of them)
    assert out[at - 1] == (
        "restarts: 2 (the run's start record, from rank 0's log: 1 crashed, 1 stopped by a signal, 0 faults, "
        "0 finished)"
    )
    assert out[at : at + 6] == [
        f"last failure: exit 201 on rank 1 at {when} (it had resumed from step 4), kept by the run (the crashed "
        f"pod was replaced): {MEANING_201} [retried]",
        '  |   File "/app/trainer/train.py", line 26, in f26',
        '  |   File "/app/trainer/train.py", line 27, in f27',
        '  |   File "/app/trainer/train.py", line 28, in f28',
        '  |   File "/app/trainer/train.py", line 29, in f29',
        "  | RuntimeError: CUDA error: an illegal memory access was encountered",
    ]
    assert not out[at + 6].startswith("  | "), out
    logs = [p for m, p in fake.requests if m == "GET" and p.startswith(f"/api/v1/namespaces/gnp/pods/{name}/log?")]
    assert any("limitBytes=65536" in p for p in logs), logs  # a bounded read of the head, never the whole log
    # a start that followed a clean end prints no report: nothing to show
    fake.logs[("gnp", name)] = "\n".join(["loading", *filler, PROGRESS]) + "\n"
    assert not [line for line in _status(fake, capsys, api, "resnet-cifar") if line.startswith("last failure")]


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_the_termination_message_is_the_failures_tail(fake, capsys, api):
    """The launcher wrote the crashed rank's traceback tail to /dev/termination-log: status shows it from the pod's
    status (it outlives log rotation) and does not read the log for it."""
    _submit(capsys, api, "resnet-cifar")
    (pod,) = _pods(fake, "resnet-cifar")
    name = pod["metadata"]["name"]
    frames = "".join(f"  frame {i}\n" for i in range(8))
    message = (
        f"exit 201: rank 1 crashed\nTraceback (most recent call last):\n{frames}torch.OutOfMemoryError: CUDA OOM\n"
    )
    pod_terminated(pod, 201, T_1H, message=message)
    fake.logs[("gnp", name)] = "the log says something else\n"
    out = _status(fake, capsys, api, "resnet-cifar")
    at = next(i for i, line in enumerate(out) if line.startswith("last failure:"))
    assert out[at + 1 : at + 6] == [
        "  |   frame 4",
        "  |   frame 5",
        "  |   frame 6",
        "  |   frame 7",
        "  | torch.OutOfMemoryError: CUDA OOM",
    ]
    assert not [p for m, p in fake.requests if f"/pods/{name}/log?" in p and "tailLines=5" in p]


def test_finished_jobs(fake, capsys):
    _submit(capsys, "pytorchjob", "resnet-cifar")
    job = _job(fake, "pytorchjob", "resnet-cifar")
    job["status"]["conditions"].append(
        {
            "type": "Succeeded",
            "status": "True",
            "reason": "PyTorchJobSucceeded",
            "message": "PyTorchJob gnp/resnet-cifar successfully completed.",
        }
    )
    job["status"]["replicaStatuses"] = {"Worker": {"succeeded": 1}}
    (pod,) = _pods(fake, "resnet-cifar")
    pod_terminated(pod, 0, T_1H)
    pod["status"]["phase"] = "Succeeded"
    fake.logs[("gnp", "resnet-cifar-worker-0")] = "progress step=1000 total_steps=1000 percent=100 eta_s=0 loss=0.2\n"
    out = _status(fake, capsys, "pytorchjob", "resnet-cifar")
    assert out[0].startswith("pytorchjob gnp/resnet-cifar: Succeeded   (recipe resnet-cifar")
    assert out[1:3] == [
        "progress: 100% (step 1000/1000), ETA 0m00s, loss 0.2   (resnet-cifar-worker-0 log)",
        f"restarts: 0 ({RESTARTS['pytorchjob']})",
    ]
    assert out[3] == "conditions:" and "replicas Worker: active 0, succeeded 1, failed 0" in out

    _submit(capsys, "trainjob", "fashion-mnist-demo")
    tj = _job(fake, "trainjob", "fashion-mnist-demo")
    tj["status"]["conditions"] = [
        {"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "jobset failed: FailJobSet for exit 2"}
    ]
    (pod,) = _pods(fake, "fashion-mnist-demo")
    pod_terminated(pod, 2, T_1H)
    fake.logs[("gnp", pod["metadata"]["name"])] = "error: data.root: /data/fmnist does not exist\n"
    out = _status(fake, capsys, "trainjob", "fashion-mnist-demo")
    meaning = next(m for s, _, m, _ in STATUSES if s == "2")
    assert out[0].startswith("trainjob gnp/fashion-mnist-demo: Failed   (recipe fashion-mnist-demo")
    assert out[1:4] == [
        f"restarts: 0 ({RESTARTS['trainjob']})",
        f"last failure: {pod['metadata']['name']} exit 2 (Error, 1h ago): {meaning} [permanent]",
        "  | error: data.root: /data/fmnist does not exist",
    ]


def test_watch_refreshes_a_bounded_number_of_times(fake, capsys, monkeypatch):
    _submit(capsys, "pytorchjob", "resnet-cifar")
    monkeypatch.setattr("gnpk8s.cli.time.sleep", lambda s: None)
    assert main(["status", "resnet-cifar", "--watch", "5", "--watch-count", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("pytorchjob gnp/resnet-cifar: Running") == 3 and out.count("(every 5 s; Ctrl-C stops)") == 3
    assert main(["status", "resnet-cifar", "--watch", "0"]) == 2


# ---------------------------------------------------------------------------------------------------
# make logs


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_logs_says_what_it_waits_for_and_stops(fake, capsys, monkeypatch, api):
    _submit(capsys, api, "resnet-cifar")
    (pod,) = _pods(fake, "resnet-cifar")
    name = pod["metadata"]["name"]
    pod_unschedulable(pod, UNSCHED)
    sleeps, real_sleep = [], time.sleep

    def sleep(s):  # the scheduler places the pod after the first poll; its image pull then waits
        sleeps.append(s)
        if len(sleeps) == 1:
            pod_waiting(pod, "ErrImagePull", "rpc error: not found")
        real_sleep(0.05)

    monkeypatch.setattr("gnpk8s.cluster.time.sleep", sleep)
    assert main(["logs", "resnet-cifar", "--api", api, "--wait", "0.5"]) == 2
    err = capsys.readouterr().err.splitlines()
    what, src, hint = (
        ("pytorchjob 'resnet-cifar'", name, "make status JOB=resnet-cifar")
        if api == "pytorchjob"
        else ("trainjob 'resnet-cifar'", "node-0", "make status JOB=resnet-cifar API=trainjob")
    )
    pulling = f"pod {name} is pending: ErrImagePull: rpc error: not found"
    assert len(sleeps) > 2 and err == [  # one line per reason, however many polls
        f"waiting for {src} of {what}: pod {name} is pending: Unschedulable: {UNSCHED}",
        f"waiting for {src} of {what}: {pulling}",
        f"error: {what}: no {src} log after 0.5 s ({pulling}); see {hint}",
    ]


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_logs_rank_and_previous(fake, capsys, api):
    _submit(capsys, api, "resnet-cifar", "nodes=2")
    _, second = _pods(fake, "resnet-cifar")
    name = second["metadata"]["name"]
    assert main(["logs", "resnet-cifar", "--api", api, "--rank", "1"]) == 0
    assert capsys.readouterr().out == f"log of {name}\nstep 1 loss 2.30\n"
    assert main(["logs", "resnet-cifar", "--api", api, "--rank", "1", "--previous", "--wait", "30"]) == 2
    container = "pytorch" if api == "pytorchjob" else "node"
    assert capsys.readouterr().err == (
        f"error: {api} 'resnet-cifar': pod {name} has no previous container log (previous terminated container "
        f'"{container}" in pod "{name}" not found)\n'
    )
    fake.previous_logs[("gnp", name)] = "before the restart\nRuntimeError: NCCL timeout\n"
    assert main(["logs", "resnet-cifar", "--api", api, "--rank", "1", "--previous"]) == 0
    assert capsys.readouterr().out == "before the restart\nRuntimeError: NCCL timeout\n"
    assert any(m == "GET" and f"/pods/{name}/log?" in p and "previous=true" in p for m, p in fake.requests)


def test_make_passes_watch_follow_rank_previous_wait():
    """make status WATCH=1 / WATCH=S and make logs FOLLOW=1 RANK= PREVIOUS=1 WAIT= reach the CLI (make -n)."""
    import subprocess

    from tests.test_k8s import ROOT

    def line(*args: str) -> str:
        p = subprocess.run(["make", "-n", *args, "JOB=resnet-cifar"], cwd=ROOT, capture_output=True, text=True)
        return " ".join(" ".join(x for x in p.stdout.splitlines() if x.strip() != "\\").replace("\\", " ").split())

    assert line("status").endswith("k8s/render.py status resnet-cifar")
    assert line("status", "WATCH=1").endswith("status resnet-cifar --watch 5")
    assert line("status", "WATCH=30").endswith("status resnet-cifar --watch 30")
    assert line("logs").endswith("k8s/render.py logs resnet-cifar")
    assert line("logs", "FOLLOW=1", "RANK=2", "PREVIOUS=1", "WAIT=30").endswith(
        "logs resnet-cifar --follow --rank 2 --previous --wait 30"
    )
