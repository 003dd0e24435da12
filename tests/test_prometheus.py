"""k8s/monitoring proven: the PodMonitor against its CRD, the dashboard's structure and ConfigMap, and every
PromQL expression of the dashboard evaluated by a real Prometheus scraping a real 2-process training run.

The slow test scrapes through the scrape config prometheus-operator would generate from podmonitor.yaml
(Kubernetes discovery replaced by static targets carrying the same __meta_kubernetes_* labels), so the labels
the dashboard filters on (namespace, pod) come from the PodMonitor exactly as in a cluster. Stand-ins
cover what a CPU machine lacks: a PrometheusSink with an injected GPU reader (the gnp_gpu_* gauges) and
static exporter texts in the real exporters' label shapes for DCGM, kube-state-metrics and Kueue (the GPU and
job-state panels); everything else comes from the real training run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, cli_env, torchrun_command
from tests.support.prom import (
    DASHBOARD,
    DASHBOARD_KEY,
    PODMONITOR,
    PODMONITOR_CRD,
    PROMETHEUS,
    Prometheus,
    StaticExporter,
    cr_errors,
    crd_schema,
    dashboard_exprs,
    documented_metrics,
    free_ports,
    load_dashboard,
    podmonitor_scrape_configs,
    render_monitoring,
    series_names,
    substitute,
    variable_queries,
    variable_values,
)

JOB_LABEL = "training.kubeflow.org/job-name"
# Series the job-state row reads from kube-state-metrics and Kueue (their names and label sets: the static
# texts below, built from kube-state-metrics docs/metrics/workload/pod-metrics.md and kueue
# pkg/metrics/metrics.go).
EXTERNAL = {
    "kube_pod_labels",
    "kube_pod_status_phase",
    "kube_pod_container_status_restarts_total",
    "kube_pod_container_status_last_terminated_exitcode",
    "kube_pod_container_status_last_terminated_reason",
    "kube_pod_container_status_terminated_reason",
    "kueue_pending_workloads",
    "kueue_admitted_active_workloads",
}
# kube_pod_labels carries a pod label only when kube-state-metrics allow-lists it (k8s/monitoring/README.md: Dashboard)
POD_JOB_LABELS = ("label_training_kubeflow_org_job_name", "label_jobset_sigs_k8s_io_jobset_name")


# ---------------------------------------------------------------- static checks


def test_podmonitor_matches_crd_and_selects_training_pods():
    pm = yaml.safe_load(PODMONITOR.read_text())
    schema = crd_schema(PODMONITOR_CRD, pm["apiVersion"])
    assert cr_errors(pm, schema) == []
    # the strict schema does catch what a typo would do
    assert cr_errors({**pm, "spec": {**pm["spec"], "podMetricEndpoints": []}}, schema)
    assert any(
        "9300 is not of type 'string'" in e
        for e in cr_errors({**pm, "spec": {**pm["spec"], "podMetricsEndpoints": [{"port": 9300}]}}, schema)
    )
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # the Helm selector gotcha
    assert "podMonitorSelectorNilUsesHelmValues" in PODMONITOR.read_text()
    assert pm["spec"]["selector"] == {"matchExpressions": [{"key": JOB_LABEL, "operator": "Exists"}]}
    assert [ep["port"] for ep in pm["spec"]["podMetricsEndpoints"]] == [f"metrics-{r}" for r in range(8)]


def test_rendered_configmap_carries_exactly_the_dashboard():
    assert not (DASHBOARD.parent / "dashboard-configmap.yaml").exists(), "the ConfigMap is rendered, not kept in git"
    out, docs = render_monitoring()
    assert [d["kind"] for d in docs][:2] == ["PodMonitor", "ConfigMap"]
    assert docs[0] == yaml.safe_load(PODMONITOR.read_text())
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["apiVersion"] == "v1" and cm["metadata"]["name"] == "gnp-training-dashboard"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # what the Grafana sidecar selects on
    assert cm["data"] == {DASHBOARD_KEY: DASHBOARD.read_text()}  # byte for byte, as the sidecar writes the file
    assert json.loads(cm["data"][DASHBOARD_KEY])["uid"] == "gnp-training"
    text = out.split("kind: ConfigMap", 1)[1]
    assert len(text.encode()) < 256 * 1024  # kubectl apply's last-applied annotation limit
    assert out == render_monitoring("resnet-imagenet")[0]  # the same for every job spec


def _render_module():
    from types import SimpleNamespace

    from gnpk8s.cli import main
    from gnpk8s.monitoring import dashboard_configmap

    return SimpleNamespace(dashboard_configmap=dashboard_configmap, main=main)


@pytest.mark.parametrize(
    "text",
    [
        '{"panels": [],\n "title": "a"}',  # no final newline
        '{"panels": [],\n\n "title": "  b  "}\n',  # an empty line inside, spaces
        '{"panels": []}\n\n\n',  # trailing empty lines
        '{\n    "panels": [], "x": "#: --- |"\n}\n',  # YAML-significant characters
    ],
)
def test_configmap_keeps_any_dashboard_text(tmp_path, text):
    render = _render_module()
    path = tmp_path / "dashboard.json"
    path.write_text(text)
    cm = yaml.safe_load(render.dashboard_configmap(path))
    assert cm["data"] == {DASHBOARD_KEY: text}


def test_bad_dashboard_is_a_user_error(tmp_path, monkeypatch, capsys):
    render = _render_module()
    bad = tmp_path / "dashboard.json"
    for content, message in (
        (None, r"dashboard\.json is missing$"),
        ('{"panels": [', r"dashboard\.json: not valid JSON \(.*\); expected a Grafana dashboard model$"),
        ("[1, 2]", r"dashboard\.json: expected a Grafana dashboard model \(a JSON object with `panels`\)$"),
    ):
        if content is not None:
            bad.write_text(content)
        monkeypatch.setattr(sys.modules[render.dashboard_configmap.__module__], "DASHBOARD_FILE", bad)
        assert render.main(["render", "fashion-mnist-demo", "--part", "monitoring"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert re.search(message, err.strip()), err
    # the job part does not need the dashboard
    assert render.main(["render", "fashion-mnist-demo", "--part", "job", "--image", "registry.test/gnp:1"]) == 0
    assert "kind: PyTorchJob" in capsys.readouterr().out


def test_dashboard_model():
    dash = load_dashboard()
    assert dash["uid"] == "gnp-training" and dash["id"] is None and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    queries = variable_queries(dash)
    assert set(queries) == {"namespace", "job", "cluster_queue"}
    # jobs and namespaces are listed from the pods' labels too: selectable before the first metric is exported
    for name, label in (("namespace", "namespace"), ("job", "job_name")):
        kind, query, regex = queries[name]
        assert kind == "query_result" and regex == f'/{label}="([^"]+)"/'[1:-1], name
        assert "gnp_steps_total" in query and all(f'{lab}!=""' in query for lab in POD_JOB_LABELS), name
    assert queries["cluster_queue"] == ("label_values", "kueue_pending_workloads", "cluster_queue")
    assert variables["cluster_queue"]["includeAll"] and variables["cluster_queue"]["allValue"] == ".*"
    assert dash["panels"][0]["type"] == "row" and dash["panels"][0]["title"] == "Job state"
    assert dash["panels"][0]["gridPos"]["y"] == 0
    ids, boxes = [], []
    for p in dash["panels"]:
        ids.append(p["id"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        boxes.append((p["title"], g["x"], g["y"], g["w"], g["h"]))
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    assert len(ids) == len(set(ids))
    for i, a in enumerate(boxes):  # no two panels overlap on the 24-column grid
        for b in boxes[i + 1 :]:
            assert a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1] or a[2] + a[4] <= b[2] or b[2] + b[4] <= a[2], (
                a[0],
                b[0],
            )
    exprs = [e for _, _, e in dashboard_exprs(dash)]
    for e in exprs:  # every query is scoped to the selected jobs and namespaces, or (Kueue) cluster queues
        for metric, matchers in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", e):
            if metric.startswith("kueue_"):
                assert 'cluster_queue=~"$cluster_queue"' in matchers, e
                continue
            assert 'namespace=~"$namespace"' in matchers, (metric, e)
            if metric == "kube_pod_labels":  # the pod -> job join: one of the allow-listed labels
                assert any(f'{lab}=~"$job"' in matchers for lab in POD_JOB_LABELS), e
            elif metric.startswith("kube_"):  # other pod series reach the job through that join only
                assert "group_left (job_name)" in e and all(f'{lab}=~"$job"' in e for lab in POD_JOB_LABELS), e
            else:
                assert 'job_name=~"$job"' in matchers, (metric, e)
    used = {m for e in exprs for m in re.findall(r"\b(gnp_[a-z0-9_]+|DCGM_FI_[A-Z_]+|kube_[a-z_]+|kueue_[a-z_]+)\b", e)}
    documented = series_names(documented_metrics())
    assert used - {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"} - EXTERNAL <= documented
    assert used & EXTERNAL == EXTERNAL  # each one is served by a stand-in exporter in the slow test
    # the panels the issue asks for, by the metric they show
    for needed in (
        "gnp_images_total",
        "gnp_step_duration_seconds_bucket",
        "gnp_data_wait_seconds_total",
        "gnp_train_loss",
        "gnp_train_loss_perturbed",
        "gnp_sharpness",
        "gnp_grad_norm_g1",
        "gnp_grad_norm_combined",
        "gnp_alpha",
        "gnp_r",
        "gnp_learning_rate",
        "gnp_eval_top1_accuracy",
        "gnp_eval_top5_accuracy",
        "gnp_checkpoint_last_success_timestamp_seconds",
        "gnp_checkpoint_failures_total",
        "gnp_restarts",
        "gnp_gpu_memory_allocated_bytes",
        "DCGM_FI_DEV_GPU_UTIL",
        "gnp_step",
        "gnp_total_steps",
        "gnp_process_start_time_seconds",
        *EXTERNAL,
    ):
        assert needed in used, needed


# ---------------------------------------------------------------- the real thing

JOB = "gnp-obs"  # the PyTorchJob name: job_name label and pod name prefix, as in a cluster
NAMESPACE = "gnp-test"
# __range: the dashboard's time range, longer than the test (panels over the range keep what they saw)
RANGE_VARS = {"__rate_interval": "10s", "__range": "10m", "__interval": "1s"}
FAKE_GPU = {"memory_allocated_bytes": 1.5e9, "utilization_ratio": 0.75}


def dcgm_text() -> str:
    """What NVIDIA's dcgm-exporter would serve on a node running the job (NVIDIA/dcgm-exporter,
    etc/default-counters.csv): GPU 0 with the pod/namespace labels of DCGM_EXPORTER_KUBERNETES=true, GPU 1 as
    it looks when the exporter is scraped without honorLabels (the exporter's own pod in `pod`, the workload's
    in exported_pod), GPU 2 of another job's pod (the panels must leave it out)."""
    gpus = [
        (0, 'pod="gnp-obs-master-0",namespace="gnp-test"', 87, 40000),
        (
            1,
            'exported_pod="gnp-obs-master-0",exported_namespace="gnp-test",pod="nvidia-dcgm-exporter-x",'
            'namespace="gpu-operator"',
            65,
            30000,
        ),
        (2, 'pod="other-master-0",namespace="gnp-test"', 10, 5000),
    ]
    lines = []
    for metric, col in (("DCGM_FI_DEV_GPU_UTIL", 2), ("DCGM_FI_DEV_FB_USED", 3)):
        lines.append(f"# TYPE {metric} gauge")
        for g in gpus:
            lines.append(
                f'{metric}{{gpu="{g[0]}",UUID="GPU-{g[0]}",device="nvidia{g[0]}",{g[1]},'
                f'modelName="NVIDIA H100 80GB HBM3",Hostname="node-a"}} {g[col]}'
            )
    return "\n".join(lines) + "\n"


# kube-state-metrics' view of the cluster: (namespace, pod, uid, phase, pod labels, {container: (restarts,
# last-terminated exit code or None, last-terminated reason or None, current terminated reason or None)}).
# This job's pods, a TrainJob's pod (JobSet label only), and pods the panels must leave out: another job whose
# name has this job's as prefix (so a pod-name-prefix match would be wrong), a pod of the same job name in
# another namespace, and an unlabelled workload.
KF = {JOB_LABEL: JOB, "training.kubeflow.org/replica-type": "worker"}
KSM_PODS = [
    (
        NAMESPACE,
        f"{JOB}-master-0",
        "uid-m0",
        "Running",
        {**KF, "training.kubeflow.org/replica-type": "master"},
        {"pytorch": (2, 137, "OOMKilled", None)},
    ),
    (NAMESPACE, f"{JOB}-worker-0", "uid-w0", "Running", KF, {"pytorch": (0, None, None, None)}),
    (
        NAMESPACE,
        f"{JOB}-2-master-0",
        "uid-o0",
        "Failed",
        {JOB_LABEL: f"{JOB}-2"},
        {"pytorch": (5, 1, "Error", "Error")},
    ),
    ("other-ns", f"{JOB}-master-0", "uid-x0", "Succeeded", {JOB_LABEL: JOB}, {"pytorch": (3, 2, "Error", "Completed")}),
    (
        NAMESPACE,
        "tj-a-node-0-0-x7k2p",
        "uid-t0",
        "Running",
        {"jobset.sigs.k8s.io/jobset-name": "tj-a"},
        {"node": (1, 143, "Error", None)},
    ),
    (NAMESPACE, "web-0", "uid-web", "Running", {"app": "web"}, {"web": (9, 255, "Error", None)}),
]
# worker-1 before and after the operator replaced it (restartPolicy ExitCode: exit 128-255 deletes the pod and
# creates a new one with the same name, a new uid and a restart count of 0)
WORKER_1_FAILED = (NAMESPACE, f"{JOB}-worker-1", "uid-w1-old", "Failed", KF, {"pytorch": (0, None, None, "Error")})
WORKER_1_NEW = (NAMESPACE, f"{JOB}-worker-1", "uid-w1-new", "Pending", KF, {"pytorch": (0, None, None, None)})
# a pod deleted meanwhile and not recreated (cleanPodPolicy, scale-down): not a recreation
WORKER_2_DELETED = (NAMESPACE, f"{JOB}-worker-2", "uid-w2", "Running", KF, {"pytorch": (0, None, None, None)})
ALLOWLIST = {JOB_LABEL, "jobset.sigs.k8s.io/jobset-name"}  # --metric-labels-allowlist=pods=[...]


def ksm_text(pods) -> str:
    """kube-state-metrics' pod series for `pods` (docs/metrics/workload/pod-metrics.md): every series has
    namespace, pod and uid; kube_pod_labels only the allow-listed labels, as label_<sanitized name>; phase one
    series per phase (1 for the current one); the reasons one series with value 1."""
    out = {name: [] for name in sorted(EXTERNAL) if name.startswith("kube_")}
    for ns, pod, uid, phase, labels, containers in pods:
        base = f'namespace="{ns}",pod="{pod}",uid="{uid}"'
        extra = "".join(
            f',label_{re.sub(r"[^a-zA-Z0-9_]", "_", k)}="{v}"' for k, v in sorted(labels.items()) if k in ALLOWLIST
        )
        out["kube_pod_labels"].append(f"kube_pod_labels{{{base}{extra}}} 1")
        for p in ("Pending", "Succeeded", "Failed", "Unknown", "Running"):
            out["kube_pod_status_phase"].append(f'kube_pod_status_phase{{{base},phase="{p}"}} {int(p == phase)}')
        for c, (restarts, code, last_reason, reason) in containers.items():
            cb = f'{base},container="{c}"'
            out["kube_pod_container_status_restarts_total"].append(
                f"kube_pod_container_status_restarts_total{{{cb}}} {restarts}"
            )
            if code is not None:
                out["kube_pod_container_status_last_terminated_exitcode"].append(
                    f"kube_pod_container_status_last_terminated_exitcode{{{cb}}} {code}"
                )
            if last_reason is not None:
                out["kube_pod_container_status_last_terminated_reason"].append(
                    f'kube_pod_container_status_last_terminated_reason{{{cb},reason="{last_reason}"}} 1'
                )
            if reason is not None:
                out["kube_pod_container_status_terminated_reason"].append(
                    f'kube_pod_container_status_terminated_reason{{{cb},reason="{reason}"}} 1'
                )
    lines = []
    for name, samples in out.items():
        lines += [f"# TYPE {name} {'counter' if name.endswith('_total') else 'gauge'}", *samples]
    return "\n".join(lines) + "\n"


CLUSTER_QUEUE = "gnp-cq"


def kueue_text() -> str:
    """Kueue's ClusterQueue gauges (pkg/metrics/metrics.go): this job's queue and another one."""
    return (
        "# TYPE kueue_pending_workloads gauge\n"
        f'kueue_pending_workloads{{cluster_queue="{CLUSTER_QUEUE}",status="active"}} 3\n'
        f'kueue_pending_workloads{{cluster_queue="{CLUSTER_QUEUE}",status="inadmissible"}} 1\n'
        'kueue_pending_workloads{cluster_queue="other-cq",status="active"} 7\n'
        'kueue_pending_workloads{cluster_queue="other-cq",status="inadmissible"} 0\n'
        "# TYPE kueue_admitted_active_workloads gauge\n"
        f'kueue_admitted_active_workloads{{cluster_queue="{CLUSTER_QUEUE}"}} 2\n'
        'kueue_admitted_active_workloads{cluster_queue="other-cq"} 4\n'
    )


@pytest.fixture
def prometheus_for_job(tmp_path):
    """Prometheus scraping ports base, base+1 (the two training ranks) and base+2 (a GPU stand-in) of a pod
    `<JOB>-master-0` in NAMESPACE through the PodMonitor's generated scrape config, plus stand-ins for the DCGM
    exporter and kube-state-metrics (honorLabels, as GPU operator's and kube-prometheus-stack's monitors scrape
    them) and for Kueue's controller. Yields (prometheus, base port, the kube-state-metrics stand-in, which
    starts with worker-1 failed and worker-2 running). Stopped by PID."""
    if not Path(PROMETHEUS).is_file():
        pytest.fail(f"{PROMETHEUS} is missing: `make setup` installs Debian's prometheus package")
    base = free_ports(3)
    pods = [
        {
            "namespace": NAMESPACE,
            "name": f"{JOB}-master-0",
            "node": "node-a",
            "container": "pytorch",
            "labels": {
                JOB_LABEL: JOB,
                "training.kubeflow.org/replica-type": "master",
                "training.kubeflow.org/replica-index": "0",
            },
            "ports": {f"metrics-{r}": f"127.0.0.1:{base + r}" for r in range(3)},
        },
        # a pod of some other workload: the selector must skip it
        {
            "namespace": NAMESPACE,
            "name": "web-0",
            "node": "node-a",
            "container": "web",
            "labels": {"app": "web"},
            "ports": {"metrics-0": f"127.0.0.1:{base}"},
        },
    ]
    pm = yaml.safe_load(PODMONITOR.read_text())
    dcgm = StaticExporter(dcgm_text())
    ksm = StaticExporter(ksm_text([*KSM_PODS, WORKER_1_FAILED, WORKER_2_DELETED]))
    kueue = StaticExporter(kueue_text())
    jobs = [
        *podmonitor_scrape_configs(pm, pods, interval="1s"),
        {
            "job_name": "dcgm-exporter",
            "honor_labels": True,
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "static_configs": [{"targets": [f"127.0.0.1:{dcgm.port}"]}],
        },
        {  # the exporter's own namespace/pod as target labels: honor_labels keeps the pods' labels
            "job_name": "kube-state-metrics",
            "honor_labels": True,
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{ksm.port}"],
                    "labels": {"namespace": "monitoring", "pod": "kube-state-metrics-0"},
                }
            ],
        },
        {
            "job_name": "kueue-controller-manager",
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "static_configs": [{"targets": [f"127.0.0.1:{kueue.port}"], "labels": {"namespace": "kueue-system"}}],
        },
    ]
    prom = Prometheus(tmp_path / "prom", free_ports(1), jobs)
    try:
        prom.wait_ready()
        yield prom, base, ksm
    finally:
        prom.stop()
        for exporter in (dcgm, ksm, kueue):
            exporter.close()


def _evaluate_all(prom: Prometheus, exprs, at: float) -> dict[tuple[str, str], list]:
    """Every (expr, namespace choice) at time `at`: the namespace selected, and Grafana's "All" (.*)."""
    out = {}
    for _, _, expr in exprs:
        for ns in (NAMESPACE, ".*"):
            cq = CLUSTER_QUEUE if ns == NAMESPACE else ".*"
            q = substitute(expr, {"job": JOB, "namespace": ns, "cluster_queue": cq, **RANGE_VARS})
            assert "$" not in q.replace('"$1"', ""), f"unsubstituted variable in {q}"
            out[(expr, ns)] = prom.query(q, at=at)
    return out


def _wait_for(prom: Prometheus, query: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not prom.query(query):
        assert time.monotonic() < deadline, f"no data for {query} after {timeout}s:\n{prom.log_tail()}"
        time.sleep(0.2)


def _panel(dash: dict, title: str) -> dict[str, str]:
    """{refId: expr} of the panel titled `title`."""
    return {ref: e for t, ref, e in dashboard_exprs(dash) if t == title}


def _by_rank(prom: Prometheus, name: str, at: float) -> dict[str, float]:
    return {r["metric"]["rank"]: r["value"] for r in prom.query(f'{name}{{job_name="{JOB}"}}', at=at)}


@pytest.mark.slow
@pytest.mark.dist
def test_dashboard_queries_on_real_prometheus(prometheus_for_job, fmnist_small, tmp_path):
    from trainer.metrics import PrometheusSink

    prom, base, ksm = prometheus_for_job
    dash = load_dashboard()
    exprs = dashboard_exprs(dash)
    dcgm = {e for _, _, e in exprs if "DCGM_FI_" in e}
    assert len(dcgm) == 2
    subst = {"job": JOB, "namespace": NAMESPACE, "cluster_queue": CLUSTER_QUEUE, **RANGE_VARS}
    # No GPU here: a third endpoint (rank "2" of the same pod) serves the gnp_gpu_* gauges from an injected
    # reader, through the same PrometheusSink code path as cuda_reader() on a GPU node. Its counters stay at
    # 0 and it sets no other gauge, so it changes no other panel's numbers.
    gpu = PrometheusSink(port=base + 2, addr="127.0.0.1", job=JOB, rank=2, local_rank=2, gpu_reader=lambda: FAKE_GPU)
    gpu.update_gpu()
    run_dir = tmp_path / "run"
    log = open(tmp_path / "torchrun.log", "w")
    cmd = torchrun_command(
        "-m",
        "trainer",
        "train",
        "--recipe",
        "debug-cpu",
        "--set",
        f"data.path={fmnist_small}",
        "--set",
        f"run.dir={run_dir}",
        "--set",
        "loop.epochs=3",
        "--set",
        "loop.log_every=1",
        "--set",
        "checkpoint.every_steps=5",
        "--set",
        "metrics.prometheus=true",
        "--set",
        f"metrics.port={base}",
        "--set",
        "metrics.addr=127.0.0.1",
        "--set",
        f"metrics.job={JOB}",
        "--set",
        "metrics.progress=lines",
    )
    # own session: on failure the whole torchrun tree is stopped by its process-group id
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # The operator replaces worker-1: kube-state-metrics first shows the failed pod, then its successor;
        # worker-2 goes away. (Done while the run starts, not before: the metrics ports stay free for it.)
        _wait_for(prom, 'kube_pod_labels{uid="uid-w1-old"}')
        ksm.set_text(ksm_text([*KSM_PODS, WORKER_1_NEW]))
        _wait_for(prom, 'kube_pod_labels{uid="uid-w1-new"}')
        # Poll until every expression returns data at one instant while the run is live: counters
        # rising (rate windows), an evaluation (end of epoch 1) and a completed checkpoint upload (saves every
        # 5 steps; the checkpointer reports an upload's success at the next save). Generous deadlines: on a
        # loaded shared machine a step can take seconds.
        deadline, at, missing = time.monotonic() + 300, None, ["(never evaluated)"]
        while time.monotonic() < deadline:
            now = time.time()
            results = _evaluate_all(prom, exprs, now)
            missing = [f"{e} [namespace={ns}]" for (e, ns), r in results.items() if not r]
            if not missing:
                at = now
                break
            if proc.poll() is not None:
                break
            time.sleep(1)
        log.flush()
        assert at is not None, (
            f"no data for {len(missing)} expressions, e.g. {missing[:3]}\n"
            f"torchrun rc={proc.poll()}:\n{(tmp_path / 'torchrun.log').read_text()[-3000:]}"
        )
        # DCGM panels: this job's two GPUs, whichever way the exporter's pod label arrived; not the other job's.
        util, fb = (
            sorted(
                (r["metric"]["pod"], r["metric"]["gpu"], r["value"]) for r in prom.query(substitute(e, subst), at=at)
            )
            for e in (next(e for e in dcgm if "GPU_UTIL" in e), next(e for e in dcgm if "FB_USED" in e))
        )
        assert util == [(f"{JOB}-master-0", "0", 87), (f"{JOB}-master-0", "1", 65)]
        assert fb == [(f"{JOB}-master-0", "0", 40000 * 2**20), (f"{JOB}-master-0", "1", 30000 * 2**20)]

        # Job-state row. kube-state-metrics panels: this job's pods in NAMESPACE only (not gnp-obs-2's, whose
        # pod names share the prefix, nor the same job name's pod in other-ns, nor web-0).
        def values(expr: str, key, **change) -> dict:
            q = substitute(expr, {**subst, **change})  # __range (10m) covers the replaced worker
            return {key(r["metric"]): r["value"] for r in prom.query(q, at=at)}

        phases = _panel(dash, "Pods by phase")["A"]
        assert values(phases, lambda m: (m["job_name"], m["phase"])) == {
            (JOB, "Running"): 2,
            (JOB, "Pending"): 1,  # worker-1's successor
            (JOB, "Failed"): 0,  # the failed worker-1 is gone
            (JOB, "Succeeded"): 0,
            (JOB, "Unknown"): 0,
        }
        # a TrainJob's pods, by their JobSet label; Grafana's "All" namespaces adds other-ns's pod
        assert values(phases, lambda m: m["phase"], job="tj-a") == {
            "Running": 1,
            "Pending": 0,
            "Failed": 0,
            "Succeeded": 0,
            "Unknown": 0,
        }
        assert values(phases, lambda m: m["phase"], namespace=".*")["Succeeded"] == 1
        terminations = _panel(dash, "Container terminations (time range)")
        pod_container = lambda m: (m["job_name"], m["pod"], m["container"])  # noqa: E731
        assert values(terminations["A"], pod_container) == {(JOB, f"{JOB}-master-0", "pytorch"): 137}
        with_reason = lambda m: (*pod_container(m), m["reason"])  # noqa: E731
        assert values(terminations["B"], with_reason) == {(JOB, f"{JOB}-master-0", "pytorch", "OOMKilled"): 1}
        # the deleted pod's termination stays visible over the range
        assert values(terminations["C"], with_reason) == {(JOB, f"{JOB}-worker-1", "pytorch", "Error"): 1}
        restarts = _panel(dash, "Restarts")
        by_job = lambda m: m["job_name"]  # noqa: E731
        assert values(restarts["A"], by_job) == {JOB: 2}  # master-0's; the replaced worker's count is not there
        assert values(restarts["B"], by_job) == {JOB: 1}  # ... but it shows as a recreated pod (not worker-2)
        assert values(restarts["C"], by_job) == {JOB: 0}  # the real run: no torchrun restart
        assert values(restarts["D"], by_job) == {JOB: 0}  # nor a process restart
        assert values(restarts["B"], by_job, job=f"{JOB}-2") == {f"{JOB}-2": 0}
        # Kueue: the selected ClusterQueue, not the other one
        kueue = _panel(dash, "Kueue workloads ($cluster_queue)")
        assert values(kueue["A"], lambda m: (m["cluster_queue"], m["status"])) == {
            (CLUSTER_QUEUE, "active"): 3,
            (CLUSTER_QUEUE, "inadmissible"): 1,
        }
        assert values(kueue["B"], lambda m: m["cluster_queue"]) == {CLUSTER_QUEUE: 2}
        # Progress and ETA of the real run: its step of 45 (3 epochs of 15 steps), while it runs
        total, step = _by_rank(prom, "gnp_total_steps", at), _by_rank(prom, "gnp_step", at)
        assert total == {"0": 45, "1": 45} and set(step) == {"0", "1"}
        progress = values(_panel(dash, "Progress")["A"], by_job)
        assert progress == {JOB: pytest.approx(max(step.values()) / 45)} and 0 < progress[JOB] < 1
        rate = prom.query(f'max(rate(gnp_steps_total{{job_name="{JOB}"}}[{RANGE_VARS["__rate_interval"]}]))', at=at)
        eta = values(_panel(dash, "ETA")["A"], by_job)
        assert rate[0]["value"] > 0 and eta == {JOB: pytest.approx((45 - max(step.values())) / rate[0]["value"])}

        # The PodMonitor's labels, as a cluster's Prometheus would attach them.
        series = prom.query(f'gnp_steps_total{{job_name="{JOB}"}}', at=at)
        got = {s["metric"]["rank"]: s["metric"] for s in series}
        assert set(got) == {"0", "1", "2"}
        for rank, labels in got.items():
            assert labels["namespace"] == NAMESPACE and labels["pod"] == f"{JOB}-master-0"
            assert labels["endpoint"] == f"metrics-{rank}" and labels["local_rank"] == rank
            assert labels["pytorchjob"] == JOB and labels["replica_type"] == "master"
            assert labels["replica_index"] == "0" and labels["node"] == "node-a"
            assert labels["container"] == "pytorch" and labels["job"] == "default/gnp-training"
        assert not prom.query('up{pod="web-0"}', at=at)  # the other workload's pod is not a target

        # Invariants of the exported numbers (debug-cpu: global batch 32 on 2 ranks, drop_last, all GNP steps,
        # r=0.1, alpha=0.8).
        steps, images = _by_rank(prom, "gnp_steps_total", at), _by_rank(prom, "gnp_images_total", at)
        hist_count = _by_rank(prom, "gnp_step_duration_seconds_count", at)
        gnp_steps = _by_rank(prom, "gnp_gnp_steps_total", at)
        for rank in ("0", "1"):
            assert steps[rank] >= 10  # near the end of epoch 1 (15 steps); ranks are scraped a moment apart
            assert images[rank] == 16 * steps[rank]
            assert hist_count[rank] == steps[rank] == gnp_steps[rank]
        assert steps["2"] == images["2"] == 0
        assert _by_rank(prom, "gnp_alpha", at) == {"0": 0.8, "1": 0.8}
        assert _by_rank(prom, "gnp_r", at) == {"0": 0.1, "1": 0.1}
        assert set(_by_rank(prom, "gnp_checkpoint_last_success_timestamp_seconds", at)) == {"0"}  # rank 0 saves
        throughput = prom.query(substitute(_panel(dash, "Throughput")["A"], subst), at=at)
        assert throughput[0]["value"] > 0
        assert _by_rank(prom, "gnp_gpu_memory_allocated_bytes", at) == {"2": FAKE_GPU["memory_allocated_bytes"]}

        # Template variables, answered the way Grafana asks: jobs and namespaces from the training metrics and
        # from the allow-listed pod labels (listed before a job exports anything), queues from Kueue.
        queries = variable_queries(dash)
        assert variable_values(prom, queries["namespace"], {}) == [NAMESPACE, "other-ns"]
        jobs = [JOB, f"{JOB}-2", "tj-a"]
        assert variable_values(prom, queries["job"], {"namespace": NAMESPACE}) == jobs
        assert variable_values(prom, queries["job"], {"namespace": "other-ns"}) == [JOB]
        assert variable_values(prom, queries["cluster_queue"], {}) == [CLUSTER_QUEUE, "other-cq"]

        # Exported names: exactly the documented list, every metric set at least once.
        names = prom.api("label/__name__/values", **{"match[]": f'{{job_name="{JOB}"}}'})
        assert set(names) == series_names(documented_metrics())

        assert proc.wait(timeout=400) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["kind"] == "done" and records[-1]["steps"] == 45
        # gnp_step took only the steps the run logged (0 from the start record)
        logged_steps = {0} | {r["step"] for r in records if r["kind"] == "train"}
        data = prom.api("query", query=f'gnp_step{{job_name="{JOB}"}}[10m]')["result"]
        assert {float(v) for m in data for _, v in m["values"]} <= logged_steps
        assert not any("step_times_s" in r for r in records)
        # Every accuracy either rank exported is one that rank 0 wrote to metrics.jsonl (the evaluation is
        # all-reduced, so both ranks report the same numbers). Ranks are scraped independently, so compare
        # over the whole run rather than at one instant.
        for metric, key in (("gnp_eval_top1_accuracy", "top1"), ("gnp_eval_top5_accuracy", "top5")):
            logged = {r[key] for r in records if r["kind"] == "eval"}
            data = prom.api("query", query=f'{metric}{{job_name="{JOB}"}}[10m]')["result"]
            exported = {m["metric"]["rank"]: {float(v) for _, v in m["values"]} for m in data}
            assert set(exported) == {"0", "1"} and all(v and v <= logged for v in exported.values()), metric
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()
        gpu.close()
