"""The dataset-conversion Job as a job kind (gnpk8s/convert.py, `--api convert` / API=convert) against the fake
API server's batch/v1 Jobs (tests/support/kube_fake_batch.py):

- submit creates NAME-convert (batch/v1 Job, its queue label when queued, created suspended then), refuses a
  second one and a spec without a convert section before any cluster call;
- status shows the Job's conditions, its pod's phase, the scheduler's pending reason, and a failed pod's exit
  status with its meaning from trainer.exits.STATUSES (exit 2: permanent, wrong input);
- logs prints the pod's log, and waits a bounded time for a pod that has not started;
- delete removes the Job and its pods (propagationPolicy Background: the API's default orphans a Job's pods).
"""

from __future__ import annotations

import time

import pytest

from gnpk8s import convert, kinds
from gnpk8s.cli import main
from tests.support import kube_fake_batch
from tests.support.kube_fake import FakeKube
from tests.support.kube_fake_kueue import FakeKueue
from tests.test_k8s import TEST_IMAGE

QUEUE = "kueue.x-k8s.io/queue-name"
JOB = "resnet-cifar"
SUBMIT = ["submit", JOB, "--image", TEST_IMAGE, "--spec", "api=convert"]


@pytest.fixture()
def serve(tmp_path, monkeypatch):
    servers: list[FakeKube] = []

    def start(**kw) -> FakeKube:
        fake = FakeKube(**kw).__enter__()
        servers.append(fake)
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / f"kc{len(servers)}", namespace="gnp")))
        return fake

    yield start
    for s in servers:
        s.__exit__(None, None, None)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _pods(fake: FakeKube) -> list[dict]:
    return [p for p in fake.pods.values() if p["metadata"]["labels"].get(convert.JOB_NAME_LABEL) == f"{JOB}-convert"]


def test_the_conversion_job_is_a_registered_kind():
    assert kinds.get("convert") is convert and convert.KIND == "Job" and convert.GROUP == "batch"
    assert convert.job_name(JOB) == f"{JOB}-convert"


def test_submit_status_logs_delete(serve, capsys):
    fake = serve()
    assert main(SUBMIT) == 0
    out = capsys.readouterr().out
    assert f"submitted convert gnp/{JOB}-convert: recipe" in out and "dataset-conversion" in out
    assert f"make status JOB={JOB} NAMESPACE=gnp API=convert" in out
    job = fake.batch_jobs[("gnp", f"{JOB}-convert")]
    assert job["kind"] == "Job" and QUEUE not in job["metadata"]["labels"] and "suspend" not in job["spec"]
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    (pod,) = _pods(fake)
    assert ("POST", "/apis/batch/v1/namespaces/gnp/jobs") in fake.requests

    assert main(["status", JOB, "--api", "convert"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"convert gnp/{JOB}-convert: Running   (dataset-conversion Job of {JOB}, recipe ")
    assert "counts: active 1, succeeded 0, failed 0" in out and pod["metadata"]["name"] in out

    assert main(["logs", JOB, "--api", "convert", "--no-follow", "--wait", "5"]) == 0
    assert capsys.readouterr().out == f"converting into {JOB}-convert\nwrote 10 samples\n"

    kube_fake_batch.finish(fake, "gnp", f"{JOB}-convert", 0)
    assert main(["status", JOB, "--api", "convert"]) == 0
    out = capsys.readouterr().out
    assert f"{JOB}-convert: Complete" in out and "exit 0 (Completed): done: success" in out

    # a second submit: one line naming the way out, nothing created
    assert main(SUBMIT) == 2
    line = _one_line_error(capsys)
    assert f"conversion Job '{JOB}-convert' already exists in namespace 'gnp'" in line
    assert f"make delete JOB={JOB} NAMESPACE=gnp API=convert" in line

    assert main(["delete", JOB, "--api", "convert"]) == 0
    assert f"deleted convert gnp/{JOB}" in capsys.readouterr().out
    assert not fake.batch_jobs and not _pods(fake)  # the pods went with it
    (delete,) = [p for m, p in fake.requests if m == "DELETE"]
    assert delete.startswith(f"/apis/batch/v1/namespaces/gnp/jobs/{JOB}-convert?") and (
        "propagationPolicy=Background" in delete
    )
    # gone: status, logs and delete say so in one line
    for cmd in ("status", "logs", "delete"):
        assert main([cmd, JOB, "--api", "convert"]) == 2
        assert f"conversion Job '{JOB}-convert' not found in namespace 'gnp'" in _one_line_error(capsys)


def test_a_failed_conversion_says_why(serve, capsys):
    fake = serve()
    assert main(SUBMIT) == 0
    kube_fake_batch.finish(fake, "gnp", f"{JOB}-convert", 2)
    capsys.readouterr()
    assert main(["status", JOB, "--api", "convert"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"convert gnp/{JOB}-convert: Failed")
    assert "PodFailurePolicy" in out and "failed with exit code 2" in out
    assert "counts: active 0, succeeded 0, failed 1" in out
    (line,) = [x for x in out.splitlines() if x.startswith(f"  {JOB}-convert-")]
    assert "exit 2 (Error): permanent: wrong input: config, recipe, dataset" in line
    # a status the table does not list, and a retried one
    assert convert.exit_meaning(143).startswith("retried: the launcher got signal N")
    assert convert.exit_meaning(77).startswith("unknown exit status")


def test_a_pending_pod_shows_the_schedulers_reason_and_logs_wait_a_bounded_time(serve, capsys):
    fake = serve()
    fake.batch_pending = "0/3 nodes are available: 3 Insufficient memory."
    assert main(SUBMIT) == 0
    capsys.readouterr()
    assert main(["status", JOB, "--api", "convert"]) == 0
    out = capsys.readouterr().out
    assert "Pending" in out and "pending: Unschedulable: 0/3 nodes are available: 3 Insufficient memory." in out
    t0 = time.monotonic()
    assert main(["logs", JOB, "--api", "convert", "--wait", "1"]) == 2
    assert 1 <= time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    pending = "is pending: Unschedulable: 0/3 nodes are available: 3 Insufficient memory."
    (waiting,) = [x for x in err.splitlines() if x.startswith("waiting for")]  # one line: the reason never changed
    assert waiting.startswith(f"waiting for convert of conversion Job '{JOB}-convert': pod {JOB}-convert-")
    assert waiting.endswith(pending)
    (error,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert error.startswith(f"error: conversion Job '{JOB}-convert': no convert log after 1 s (pod {JOB}-convert-")
    assert error.endswith(f"{pending}); see make status JOB={JOB} API=convert")


def test_queued_conversion_job_carries_the_label_and_waits_for_kueue(serve, capsys):
    fake = serve(kueue=FakeKueue())  # Kueue's defaults manage batch/job
    assert main([*SUBMIT, "--spec", "queue=team-a", "--queue-wait", "5"]) == 0
    job = fake.batch_jobs[("gnp", f"{JOB}-convert")]
    assert job["metadata"]["labels"][QUEUE] == "team-a" and job["spec"]["suspend"] is True
    assert not _pods(fake)  # suspended until Kueue admits it
    assert "queued: Kueue Workload job-resnet-cifar-convert-" in capsys.readouterr().err
    assert main(["status", JOB, "--api", "convert"]) == 0
    assert "Suspended (waiting for Kueue to admit it)" in capsys.readouterr().out


def test_a_queued_conversion_job_kueue_does_not_manage_stops_with_the_fix(serve, capsys):
    fake = serve(kueue=FakeKueue(frameworks=()))
    assert main([*SUBMIT, "--spec", "queue=team-a", "--queue-wait", "0.3"]) == 2
    line = _one_line_error(capsys)
    assert "convert gnp/resnet-cifar is suspended but Kueue made no Workload" in line
    assert "add `batch/job` to integrations.frameworks" in line and "API=convert and submit again" in line
    assert not _pods(fake)


def test_a_spec_without_a_convert_section_stops_before_the_cluster(serve, capsys, monkeypatch):
    fake = serve()
    monkeypatch.setattr(convert, "conversion_job", lambda spec: None)
    assert main(SUBMIT) == 2
    assert "has no convert section" in _one_line_error(capsys)
    assert fake.requests == []


def test_make_names_the_kind_with_api_or_part_convert():
    import os
    import subprocess

    from tests.test_k8s import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("GNP_IMAGE", "IMAGE", "MAKEFLAGS", "API", "PART")}
    for extra in ("API=convert", "PART=convert"):
        for target, want in (
            ("submit", "--spec api=convert"),
            ("status", "--api convert"),
            ("delete", "--api convert"),
        ):
            p = subprocess.run(
                ["make", "-n", target, f"JOB={JOB}", "IMAGE=reg.test/x:1", extra],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env=env,
                timeout=60,
            )
            assert p.returncode == 0 and want in p.stdout, (target, extra, p.stdout, p.stderr)
    p = subprocess.run(["make", "-n", "status", f"JOB={JOB}"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert "--api" not in p.stdout  # the default kind


def test_render_all_of_the_convert_kind_has_the_job_once(capsys):
    assert main(["render", JOB, "--image", TEST_IMAGE, "--spec", "api=convert", "--part", "all"]) == 0
    assert capsys.readouterr().out.count("\nkind: Job\n") == 1
