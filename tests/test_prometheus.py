"""k8s/monitoring proven: the PodMonitor against its CRD, the dashboard's structure and ConfigMap, and every
PromQL expression of the dashboard evaluated by a real Prometheus scraping a real 2-process training run.

The slow test scrapes through the scrape config prometheus-operator would generate from podmonitor.yaml
(Kubernetes discovery replaced by static targets carrying the same __meta_kubernetes_* labels), so the labels
the dashboard filters on (namespace, pod) come from the PodMonitor exactly as in a cluster. Two stand-ins
cover what a CPU machine lacks: a PrometheusSink with an injected GPU reader (the gnp_gpu_* gauges) and a
static DCGM exporter text (the DCGM panels); everything else comes from the real training run.
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

from tests.conftest import ROOT, cli_env
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
    template_queries,
)

JOB_LABEL = "training.kubeflow.org/job-name"


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
    assert set(template_queries(dash)) == {"namespace", "job"}
    assert template_queries(dash)["job"][1] == "job_name"
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
    for e in exprs:  # every query is scoped to the selected jobs and namespaces
        assert 'job_name=~"$job"' in e and 'namespace=~"$namespace"' in e, e
    used = {m for e in exprs for m in re.findall(r"\b(gnp_[a-z0-9_]+|DCGM_FI_[A-Z_]+)\b", e)}
    documented = series_names(documented_metrics())
    assert used - {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"} <= documented
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
    ):
        assert needed in used, needed


# ---------------------------------------------------------------- the real thing

JOB = "gnp-obs"  # the PyTorchJob name: job_name label and pod name prefix, as in a cluster
NAMESPACE = "gnp-test"
RANGE_VARS = {"__rate_interval": "10s", "__range": "1m", "__interval": "1s"}
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


@pytest.fixture
def prometheus_for_job(tmp_path):
    """Prometheus scraping ports base, base+1 (the two training ranks) and base+2 (a GPU stand-in) of a pod
    `<JOB>-master-0` in NAMESPACE through the PodMonitor's generated scrape config, plus a DCGM exporter
    stand-in (honorLabels, as GPU operator's ServiceMonitor). Stopped by PID."""
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
    jobs = [
        *podmonitor_scrape_configs(pm, pods, interval="1s"),
        {
            "job_name": "dcgm-exporter",
            "honor_labels": True,
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "static_configs": [{"targets": [f"127.0.0.1:{dcgm.port}"]}],
        },
    ]
    prom = Prometheus(tmp_path / "prom", free_ports(1), jobs)
    try:
        prom.wait_ready()
        yield prom, base
    finally:
        prom.stop()
        dcgm.close()


def _evaluate_all(prom: Prometheus, exprs, at: float) -> dict[tuple[str, str], list]:
    """Every (expr, namespace choice) at time `at`: the namespace selected, and Grafana's "All" (.*)."""
    out = {}
    for _, _, expr in exprs:
        for ns in (NAMESPACE, ".*"):
            q = substitute(expr, {"job": JOB, "namespace": ns, **RANGE_VARS})
            assert "$" not in q.replace('"$1"', ""), f"unsubstituted variable in {q}"
            out[(expr, ns)] = prom.query(q, at=at)
    return out


def _by_rank(prom: Prometheus, name: str, at: float) -> dict[str, float]:
    return {r["metric"]["rank"]: r["value"] for r in prom.query(f'{name}{{job_name="{JOB}"}}', at=at)}


@pytest.mark.slow
@pytest.mark.dist
def test_dashboard_queries_on_real_prometheus(prometheus_for_job, fmnist_small, tmp_path):
    from trainer.metrics import PrometheusSink

    prom, base = prometheus_for_job
    dash = load_dashboard()
    exprs = dashboard_exprs(dash)
    dcgm = {e for _, _, e in exprs if "DCGM_FI_" in e}
    assert len(dcgm) == 2
    subst = {"job": JOB, "namespace": NAMESPACE, **RANGE_VARS}
    # No GPU here: a third endpoint (rank "2" of the same pod) serves the gnp_gpu_* gauges from an injected
    # reader, through the same PrometheusSink code path as cuda_reader() on a GPU node. Its counters stay at
    # 0 and it sets no other gauge, so it changes no other panel's numbers.
    gpu = PrometheusSink(port=base + 2, addr="127.0.0.1", job=JOB, rank=2, local_rank=2, gpu_reader=lambda: FAKE_GPU)
    gpu.update_gpu()
    run_dir = tmp_path / "run"
    log = open(tmp_path / "torchrun.log", "w")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
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
    ]
    # own session: on failure the whole torchrun tree is stopped by its process-group id
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Poll until every expression returns data at one instant while the run is live: counters
        # rising (rate windows), an evaluation (end of epoch 1) and a completed checkpoint upload (saves every
        # 5 steps; the checkpointer reports an upload's success at the next save).
        deadline, at, missing = time.monotonic() + 100, None, ["(never evaluated)"]
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
        throughput = prom.query(substitute(exprs[0][2], subst), at=at)
        assert exprs[0][0] == "Throughput" and throughput[0]["value"] > 0
        assert _by_rank(prom, "gnp_gpu_memory_allocated_bytes", at) == {"2": FAKE_GPU["memory_allocated_bytes"]}

        # Template variables, answered the way Grafana asks (label values of a series selector).
        for var, (selector, label) in template_queries(dash).items():
            values = prom.api(f"label/{label}/values", **{"match[]": substitute(selector, {"namespace": ".*"})})
            assert values == [{"namespace": NAMESPACE, "job": JOB}[var]], var

        # Exported names: exactly the documented list, every metric set at least once.
        names = prom.api("label/__name__/values", **{"match[]": f'{{job_name="{JOB}"}}'})
        assert set(names) == series_names(documented_metrics())

        assert proc.wait(timeout=120) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["kind"] == "done" and records[-1]["steps"] == 45
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
