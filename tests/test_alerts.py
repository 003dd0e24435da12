"""The alerts (k8s/monitoring/prometheusrule.yaml, rendered from the ALERTS table of k8s/gnpk8s/alerts.py) proven:

- the rendered PrometheusRule validates strictly against prometheus-operator's CRD and carries the `release:`
  label kube-prometheus-stack's rule selector needs; the committed file is what the renderer produces;
- thresholds come from the spec's `alerts:` (or `--spec alerts.KEY=VALUE`), bad values are one-line errors;
- `promtool test rules` on synthetic scrape histories: every alert fires on the series meant to fire it and
  nothing fires on a healthy run, a slow-but-alive run or a run that restarted once;
- a real Prometheus evaluating the rule rendered with test-sized thresholds against a real 2-rank torchrun
  run: nothing fires while it trains, GNPTrainingStalled fires once a rank is stopped with SIGSTOP.

Run as a module to regenerate the committed rule: `.venv/bin/python -m tests.test_alerts`.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gnpk8s.alerts import default_alert_rule_text, render_alert_rule, rule_yaml
from gnpk8s.manifests import render
from gnpk8s.spec import load_job
from gnpk8s.thresholds import alert_thresholds

ROOT = Path(__file__).resolve().parents[1]
RULE_FILE = ROOT / "k8s" / "monitoring" / "prometheusrule.yaml"
# Copied unchanged from prometheus-operator v0.93.0, example/prometheus-operator-crd-full/
# monitoring.coreos.com_prometheusrules.yaml (commit f8fafd4 of github.com/prometheus-operator/prometheus-operator).
RULE_CRD = ROOT / "tests" / "data" / "crds" / "monitoring.coreos.com_prometheusrules.yaml"
PROMTOOL = "/usr/bin/promtool"


ALERTS = [
    "GNPTrainingStalled",
    "GNPLossNotFinite",
    "GNPScalerSkippingSteps",
    "GNPGradNormExploding",
    "GNPLossExploding",
    "GNPTrainingRestarting",
    "GNPCheckpointUploadFailing",
    "GNPCheckpointStale",
    "GNPInputBound",
    "GNPGPUsIdle",
]


def _promtool_cmd(*args: str) -> list[str]:
    if not Path(PROMTOOL).is_file():
        pytest.fail(f"{PROMTOOL} is missing: `make setup` installs Debian's prometheus package, which ships it")
    return [PROMTOOL, *args]


def _rules(doc: dict) -> list[dict]:
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def _rule_of(docs: list[dict]) -> dict:
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return rule


def _render_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "k8s" / "render.py"), "render", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---------------------------------------------------------------- the manifest


def test_committed_rule_is_the_rendered_default():
    assert RULE_FILE.read_text() == default_alert_rule_text(), (
        "k8s/monitoring/prometheusrule.yaml is stale: run `.venv/bin/python -m tests.test_alerts`"
    )


def test_the_alert_table_names_its_thresholds():
    """Each row of alerts.ALERTS lists every threshold its templates use (an alert is rendered only when all of
    its thresholds are set), and every other placeholder is one of the renderer's own values."""
    from gnpk8s import alerts
    from gnpk8s.thresholds import ALERT_DEFAULTS

    own = set(alerts._context(alert_thresholds(None), None))
    assert not own & set(ALERT_DEFAULTS)
    for row in alerts.ALERTS:
        texts = (row.expr, row.pending, row.summary, row.description, row.runbook)
        used = {m.group(1) for text in texts for m in alerts.PLACEHOLDER.finditer(text)}
        assert used - own <= set(row.keys) <= set(ALERT_DEFAULTS), row.name
    assert [a.name for a in alerts.ALERTS] == [*ALERTS, "GNPAccuracyDropped"]  # the committed rule's order


def test_rule_validates_against_the_crd():
    from tests.support.prom import cr_errors, crd_schema

    schema = crd_schema(RULE_CRD, "monitoring.coreos.com/v1")
    default = yaml.safe_load(RULE_FILE.read_text())
    own = yaml.safe_load(rule_yaml(render_alert_rule({**alert_thresholds(None), "accuracy_drop": 0.05}, "j", "ns")))
    for doc in (default, own):
        assert cr_errors(doc, schema) == []
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # the chart's ruleSelector
    # the strict schema does catch mistakes: a misspelled field, a duration the CRD's pattern rejects
    bad = yaml.safe_load(RULE_FILE.read_text())
    bad["spec"]["groups"][0]["rules"][0]["fors"] = "1m"
    bad["spec"]["groups"][0]["rules"][1]["for"] = "1 minute"
    errors = cr_errors(bad, schema)
    assert any("fors" in e for e in errors) and any("1 minute" in e for e in errors), errors
    # every alert: severity, and a summary naming namespace, job and rank (or pod), description, runbook
    rules = _rules(default)
    assert [r["alert"] for r in rules] == ALERTS
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        summary = r["annotations"]["summary"]
        assert "$labels.namespace" in summary and "$labels.job_name" in summary, r["alert"]
        assert ("$labels.rank" in summary) or ("$labels.pod" in summary), r["alert"]
        assert "make " in r["annotations"]["runbook"] and r["annotations"]["description"], r["alert"]
        assert 'job_name!=""' in r["expr"] and r["expr"].rstrip().endswith("unless on (job_name) gnp:alert_overrides")
    assert "GNPAccuracyDropped" in [r.get("alert") for r in _rules(own)]  # off by default, on when set


def test_promtool_accepts_the_rules(tmp_path):
    default = yaml.safe_load(RULE_FILE.read_text())
    own = render_alert_rule({**alert_thresholds(None), "accuracy_drop": 0.05}, "j")
    for i, doc in enumerate((default, own)):
        path = tmp_path / f"r{i}.yml"
        path.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
        out = subprocess.run(_promtool_cmd("check", "rules", str(path)), capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr  # also parses the annotation templates


def test_monitoring_part_carries_the_rule():
    out = _render_cli("fashion-mnist-demo", "--part", "monitoring")
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith(RULE_FILE.read_text())  # the cluster-wide rule, verbatim
    out = _render_cli(
        "fashion-mnist-demo",
        "--part",
        "monitoring",
        "--name",
        "demo-a",
        "-n",
        "team-a",
        "--spec",
        "alerts.stall_floor=30m",
        "--spec",
        "alerts.accuracy_drop=0.1",
    )
    assert out.returncode == 0, out.stderr
    rule = _rule_of([d for d in yaml.safe_load_all(out.stdout) if d])
    assert rule["metadata"]["name"] == "gnp-training-alerts-demo-a" and rule["metadata"]["namespace"] == "team-a"
    rules = _rules(rule)
    for r in rules[:-1]:
        assert 'job_name="demo-a"' in r["expr"] and 'job_name!=""' not in r["expr"] and "unless" not in r["expr"]
    assert rules[-1] == {"record": "gnp:alert_overrides", "expr": "vector(1)", "labels": {"job_name": "demo-a"}}
    stalled = next(r for r in rules if r["alert"] == "GNPTrainingStalled")
    assert "> 1800)" in stalled["expr"] and "+ 1800)" in stalled["expr"]  # 30m floor, in seconds
    assert "> 0.1\n" in next(r for r in rules if r["alert"] == "GNPAccuracyDropped")["expr"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("alerts.stall_flor=5m", "alerts.stall_flor: unknown key; did you mean 'stall_floor'?"),
        ("alerts.stall_floor=5", "alerts.stall_floor: expected a Prometheus duration"),
        ("alerts.stall_floor=0s", "alerts.stall_floor: expected a Prometheus duration"),
        ("alerts.stall_factor=-1", "alerts.stall_factor: expected a number > 0"),
        ("alerts.data_wait_fraction=1.5", "alerts.data_wait_fraction: expected a number between 0 and 1"),
        ("alerts.max_restarts=2.5", "alerts.max_restarts: expected an integer >= 0"),
        ("alerts.gpu_idle_percent=true", "alerts.gpu_idle_percent: expected a number in (0, 100]"),
        ("alerts=[1]", "alerts: expected dict"),
    ],
)
def test_bad_thresholds_are_one_line_errors(spec, message):
    out = _render_cli("fashion-mnist-demo", "--part", "monitoring", "--spec", spec)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


def test_thresholds_merge_over_defaults():
    job = load_job("fashion-mnist-demo", spec_overrides=["alerts.max_restarts=0", "alerts.pending=30s"])
    assert job.alerts == {**alert_thresholds(None), "max_restarts": 0, "pending": "30s"}
    assert load_job("fashion-mnist-demo").alerts is None  # no `alerts:`: the cluster-wide rule


def test_dashboard_shows_the_job_alerts():
    from tests.support.prom import load_dashboard

    panels = [p for p in load_dashboard()["panels"] if any("ALERTS" in t.get("expr", "") for t in p.get("targets", []))]
    assert len(panels) == 1
    expr = panels[0]["targets"][0]["expr"]
    assert 'alertname=~"GNP.*"' in expr and 'job_name=~"$job"' in expr and 'namespace=~"$namespace"' in expr


# ---------------------------------------------------------------- promtool unit tests on synthetic runs

SCRAPE = 15  # seconds between samples: the PodMonitor's interval
NS = "team-a"


def _fmt(v: float | None) -> str:
    if v is None:
        return "_"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if v == math.inf:
        return "+Inf"
    return f"{v:.6g}" if isinstance(v, float) and not float(v).is_integer() else str(int(v))


def synthetic_run(
    job: str = "demo",
    *,
    hours: float = 3.0,
    step_s: float = 0.3,
    wait_s: float = 0.02,
    log_every: int = 50,
    startup_s: float = 60,
    pauses: tuple[tuple[float, float], ...] = ((1800, 120), (3600, 120), (5400, 120), (7200, 120), (9000, 120)),
    stall_at: float | None = None,
    restarts: tuple[float, ...] = (),
    loss_nan_at: float | None = None,
    loss_inf_at: float | None = None,
    skip_from: float | None = None,
    skip_share: float = 0.0,
    loss_jump: tuple[float, float] | None = None,
    g1_jump: tuple[float, float] | None = None,
    ckpt_every: float = 1200,
    ckpt_stop_at: float | None = None,
    ckpt_fail_from: float | None = None,
    gpu_util: float = 85,
    gpu_idle_from: float | None = None,
    dcgm_exported: bool = False,
    top1: tuple[tuple[float, float], ...] = (),
) -> dict[str, str]:
    """Scrape history of a 2-rank, 1-pod job, one sample every SCRAPE s from t=0 (promtool's epoch), as
    promtool `input_series` ({series: values}). Counters move only at log steps (every `log_every` steps,
    like trainer/metrics.py); evaluations pause stepping (`pauses`); a restart recreates the process: its
    series are absent for 30 s, then restart from 0 with a new start time."""
    n = int(hours * 3600 / SCRAPE) + 1
    times = [i * SCRAPE for i in range(n)]
    out: dict[str, list] = {}

    def put(name: str, labels: dict, t_index: int, value) -> None:
        key = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        out.setdefault(key, [None] * n)[t_index] = value

    starts = (0.0,) + tuple(restarts)
    for i, t in enumerate(times):
        start = max(s for s in starts if s <= t)
        if start > 0 and t < start + 30:  # the new process is not up yet
            continue
        process_start = start
        # stepping time since the process started: minus startup, evaluation pauses and a stall
        te = t if stall_at is None else min(t, stall_at)

        def steps_by(te: float, start: float = start) -> int:
            """Steps counted (at log steps) by time te of the process started at `start`."""
            active = te - start - startup_s
            for p0, dur in pauses:
                if p0 >= start:
                    active -= min(max(te - p0, 0.0), dur)
            return math.floor(max(active, 0.0) / (log_every * (step_s + wait_s))) * log_every

        steps = steps_by(te)
        k = i // 4  # a new loss value at every log step: alternate +-5 % noise
        loss = (2.0 * math.exp(-t / 3600) + 0.2) * (1.05 if k % 2 else 0.95)
        g1 = 0.5 * (1.02 if k % 2 else 0.98)
        if loss_jump and t >= loss_jump[0]:
            loss *= loss_jump[1]
        if g1_jump and t >= g1_jump[0]:
            g1 *= g1_jump[1]
        if loss_nan_at is not None and t >= loss_nan_at:
            loss = math.nan
        if loss_inf_at is not None and t >= loss_inf_at:
            loss = math.inf
        for rank in (0, 1):
            lab = {"namespace": NS, "pod": f"{job}-master-0", "job_name": job, "rank": rank, "local_rank": rank}
            put("gnp_steps_total", lab, i, steps)
            # fp16: one step in 2,000 skipped while the scale adapts (normal); skip_share of them from skip_from
            skipped = steps // 2000
            if skip_from is not None and te > skip_from:
                skipped += math.floor((steps - steps_by(max(skip_from, start))) * skip_share)
            put("gnp_scaler_skipped_steps_total", lab, i, max(skipped, 0))
            put("gnp_step_duration_seconds_sum", lab, i, steps * step_s)
            put("gnp_step_duration_seconds_count", lab, i, steps)
            put("gnp_data_wait_seconds_total", lab, i, steps * wait_s)
            put("gnp_process_start_time_seconds", lab, i, process_start)
            if steps:
                put("gnp_train_loss", lab, i, loss)
                put("gnp_grad_norm_g1", lab, i, g1)
            put("gnp_checkpoint_failures_total", lab, i, 0)
            if rank == 0:
                last = math.floor(t / ckpt_every) * ckpt_every
                if ckpt_stop_at is not None:
                    last = min(last, math.floor(ckpt_stop_at / ckpt_every) * ckpt_every)
                if ckpt_fail_from is not None:
                    last = min(last, math.floor(ckpt_fail_from / ckpt_every) * ckpt_every)
                    fails = max(0, math.floor((t - ckpt_fail_from) / 600) + 1) if t >= ckpt_fail_from else 0
                    put("gnp_checkpoint_failures_total", lab, i, fails)
                if last > 0:
                    put("gnp_checkpoint_last_success_timestamp_seconds", lab, i, last)
            for t_eval, acc in top1:
                if t >= t_eval:
                    put("gnp_eval_top1_accuracy", lab, i, acc)
        util = gpu_util if gpu_idle_from is None or t < gpu_idle_from else 3
        for gpu in (0, 1):
            where = (
                {"exported_namespace": NS, "exported_pod": f"{job}-master-0", "namespace": "gpu-operator"}
                if dcgm_exported
                else {"namespace": NS, "pod": f"{job}-master-0"}
            )
            put("DCGM_FI_DEV_GPU_UTIL", {"gpu": gpu, "Hostname": "node-a", **where}, i, util)
    return {k: " ".join(_fmt(v) for v in vals) for k, vals in out.items()}


def _rank_labels(job: str, rank: int) -> dict:
    return {"namespace": NS, "pod": f"{job}-master-0", "job_name": job, "rank": str(rank), "local_rank": str(rank)}


def fires(alert: str, job: str = "demo", ranks=(0, 1)) -> list[dict]:
    """The alerts promtool must list as firing: their labels (the expression's plus severity)."""
    severity = {"GNPTrainingStalled", "GNPLossNotFinite", "GNPScalerSkippingSteps", "GNPCheckpointUploadFailing"}
    sev = "critical" if alert in severity else "warning"
    if alert == "GNPTrainingRestarting":
        return [{"exp_labels": {"namespace": NS, "job_name": job, "rank": "0", "severity": sev}}]
    if alert == "GNPGPUsIdle":
        return [{"exp_labels": {"namespace": NS, "pod": f"{job}-master-0", "job_name": job, "severity": sev}}]
    return [{"exp_labels": {**_rank_labels(job, r), "severity": sev}} for r in ranks]


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


# (name, run keyword arguments, [(eval time s, alert, fires?, ranks)]); `hours` bounds the series.
H = 3600
SCENARIOS: list[tuple[str, dict, list[tuple[float, str, bool, tuple]]]] = [
    # --- runs that must fire nothing, every alert checked at several times
    ("healthy", {}, [(t, a, False, ()) for t in (600, 1860, 2 * H, 3 * H - 60) for a in ALERTS]),
    # 20 s steps, a log step every 20: the counter rises every ~7 min (9 with an evaluation pause), close to
    # the 10 min floor
    (
        "slow-but-alive",
        {"hours": 6, "step_s": 20, "wait_s": 0.5, "log_every": 20, "ckpt_every": 3600},
        [(t, a, False, ()) for t in (540, 900, 1800, 2 * H, 4 * H, 6 * H - 60) for a in ALERTS],
    ),
    (
        "restarted-once",
        {"restarts": (4000,)},
        [(t, a, False, ()) for t in (4020, 4200, 5 * 1200, 3 * H - 60) for a in ALERTS],
    ),
    # --- each alert fired, with the moment just before it must fire
    (
        "stalled",
        {"stall_at": 2 * H},
        [(2 * H + 8 * 60, "GNPTrainingStalled", False, ()), (2 * H + 14 * 60, "GNPTrainingStalled", True, (0, 1))],
    ),
    # the threshold follows the step time: 5 x 410 s for the slow run, so 20 min without a step (beyond the
    # 10 min floor) is still normal there, 45 min is not
    (
        "slow-stalled",
        {"hours": 4, "step_s": 20, "wait_s": 0.5, "log_every": 20, "ckpt_every": 3600, "stall_at": 3 * H},
        [(3 * H + 20 * 60, "GNPTrainingStalled", False, ()), (3 * H + 45 * 60, "GNPTrainingStalled", True, (0, 1))],
    ),
    # a process that never takes a step is measured from its start
    (
        "stuck-at-start",
        {"hours": 1, "startup_s": 10 * H},
        [(8 * 60, "GNPTrainingStalled", False, ()), (14 * 60, "GNPTrainingStalled", True, (0, 1))],
    ),
    (
        "loss-nan",
        {"loss_nan_at": 2 * H},
        [(2 * H + 60, "GNPLossNotFinite", False, ()), (2 * H + 4 * 60, "GNPLossNotFinite", True, (0, 1))],
    ),
    ("loss-inf", {"loss_inf_at": 2 * H}, [(2 * H + 4 * 60, "GNPLossNotFinite", True, (0, 1))]),
    # 90 % of the steps skipped from 2h: more than half of the last 30 min's steps after ~17 min, + for 2m
    (
        "scaler-skipping",
        {"skip_from": 2 * H, "skip_share": 0.9},
        [
            (2 * H + 10 * 60, "GNPScalerSkippingSteps", False, ()),
            (2 * H + 25 * 60, "GNPScalerSkippingSteps", True, (0, 1)),
        ],
    ),
    # 30 % skipped stays below the 50 % threshold
    (
        "scaler-some-skips",
        {"skip_from": 2 * H, "skip_share": 0.3},
        [(2 * H + 50 * 60, "GNPScalerSkippingSteps", False, ())],
    ),
    (
        "g1-explodes",
        {"g1_jump": (2 * H, 30)},
        [(2 * H + 60, "GNPGradNormExploding", False, ()), (2 * H + 5 * 60, "GNPGradNormExploding", True, (0, 1))],
    ),
    # 8x the loss fires (factor 4), 3x does not
    (
        "loss-explodes",
        {"loss_jump": (2 * H, 8)},
        [(2 * H + 60, "GNPLossExploding", False, ()), (2 * H + 5 * 60, "GNPLossExploding", True, (0, 1))],
    ),
    ("loss-triples", {"loss_jump": (2 * H, 3)}, [(2 * H + 10 * 60, "GNPLossExploding", False, ())]),
    # 4 restarts within the hour (more than 3) fire; 3 do not
    (
        "crash-loop",
        {"restarts": (3600, 4200, 4800, 5400), "pauses": ()},
        [(5380, "GNPTrainingRestarting", False, ()), (5500, "GNPTrainingRestarting", True, (0,))],
    ),
    ("three-restarts", {"restarts": (3600, 4200, 4800)}, [(5000, "GNPTrainingRestarting", False, ())]),
    # uploads fail from 1h10 (last success at 1h00): firing once failures have lasted an hour past it
    (
        "uploads-failing",
        {"ckpt_fail_from": 4200},
        [
            (3600 + 50 * 60, "GNPCheckpointUploadFailing", False, ()),
            (2 * H + 5 * 60, "GNPCheckpointUploadFailing", True, (0,)),
        ],
    ),
    # successes every 20 min until 1h, then none (and no failure reported): stale after 3 x 20 min + for
    (
        "checkpoints-stop",
        {"ckpt_stop_at": 3600},
        [(3600 + 55 * 60, "GNPCheckpointStale", False, ()), (3600 + 64 * 60, "GNPCheckpointStale", True, (0,))],
    ),
    # half the wall time waiting for data
    (
        "input-bound",
        {"hours": 1, "step_s": 0.1, "wait_s": 0.1, "pauses": ()},
        [(20 * 60, "GNPInputBound", True, (0, 1)), (H - 60, "GNPInputBound", True, (0, 1))],
    ),
    (
        "gpus-idle",
        {"gpu_idle_from": 2 * H},
        [(2 * H + 10 * 60, "GNPGPUsIdle", False, ()), (2 * H + 16 * 60, "GNPGPUsIdle", True, ())],
    ),
    # dcgm-exporter scraped without honorLabels: the workload's pod in exported_pod
    (
        "gpus-idle-exported",
        {"gpu_idle_from": 2 * H, "dcgm_exported": True},
        [(2 * H + 16 * 60, "GNPGPUsIdle", True, ())],
    ),
]


def _alert_tests(job: str, checks) -> list[dict]:
    out = []
    for t, alert, fire, ranks in checks:
        exp = fires(alert, job, ranks or (0, 1)) if fire else []
        out.append({"eval_time": _minutes(t), "alertname": alert, "exp_alerts": exp})
    return out


def _strip(doc: dict) -> dict:
    """The rule groups as a rules file, annotations removed: promtool compares them verbatim with the
    templates expanded, and the templates are checked by `promtool check rules` and the real-server test."""
    groups = []
    for g in doc["spec"]["groups"]:
        rules = [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]
        groups.append({**g, "rules": rules})
    return {"groups": groups}


def _promtool(tmp_path: Path, rule_docs: list[dict], tests: list[dict], name: str = "t") -> subprocess.CompletedProcess:
    files = []
    for i, doc in enumerate(rule_docs):
        path = tmp_path / f"{name}-rules{i}.yml"
        path.write_text(yaml.safe_dump(_strip(doc), sort_keys=False))
        files.append(path.name)
    test = tmp_path / f"{name}.yml"
    test.write_text(
        yaml.safe_dump(
            {"rule_files": files, "evaluation_interval": "1m", "tests": tests}, sort_keys=False, width=1 << 30
        )
    )
    return subprocess.run(_promtool_cmd("test", "rules", test.name), cwd=tmp_path, capture_output=True, text=True)


def _counts() -> tuple[int, int]:
    fire = sum(1 for _, _, checks in SCENARIOS for c in checks if c[2])
    return fire, sum(1 for _, _, checks in SCENARIOS for c in checks if not c[2])


def test_promtool_every_alert_fires_and_healthy_runs_fire_nothing(tmp_path):
    rule = yaml.safe_load(RULE_FILE.read_text())
    tests = []
    for name, kwargs, checks in SCENARIOS:
        series = synthetic_run(**kwargs)
        tests.append(
            {
                "name": name,
                "interval": f"{SCRAPE}s",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": _alert_tests("demo", checks),
            }
        )
    fired = {c[1] for _, _, checks in SCENARIOS for c in checks if c[2]}
    assert fired == set(ALERTS)  # every alert has a case that fires it
    t0 = time.monotonic()
    out = _promtool(tmp_path, [rule], tests)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    fire, quiet = _counts()
    print(f"promtool: {fire} fire and {quiet} no-fire checks in {time.monotonic() - t0:.1f} s")


def test_promtool_would_notice_a_wrong_expectation(tmp_path):
    """The harness can fail: a healthy run claimed to be stalled, and a stalled one claimed healthy."""
    rule = yaml.safe_load(RULE_FILE.read_text())
    for kwargs, fire in (({"hours": 2.5}, True), ({"hours": 2.5, "stall_at": 2 * H}, False)):
        checks = [(2 * H + 14 * 60, "GNPTrainingStalled", fire, (0, 1))]
        tests = [
            {
                "interval": f"{SCRAPE}s",
                "input_series": [{"series": s, "values": v} for s, v in synthetic_run(**kwargs).items()],
                "alert_rule_test": _alert_tests("demo", checks),
            }
        ]
        out = _promtool(tmp_path, [rule], tests)
        assert out.returncode != 0 and "GNPTrainingStalled" in out.stdout + out.stderr


def test_promtool_job_thresholds_replace_the_cluster_wide_rule(tmp_path):
    """A job with its own rule (stall floor 30 min) is skipped by the cluster-wide rule, whose 10 min floor
    would fire; another job stays covered by the cluster-wide rule. The accuracy alert, off by default,
    fires from the job's rule."""
    default = yaml.safe_load(RULE_FILE.read_text())
    own = render_alert_rule({**alert_thresholds(None), "stall_floor": "30m", "accuracy_drop": 0.05}, "custom", NS)
    accuracy = ((1800, 0.6), (3600, 0.8), (5400, 0.9), (7200, 0.86), (9000, 0.8))
    series = {
        **synthetic_run("custom", hours=2.7, stall_at=2 * H, top1=accuracy),
        **synthetic_run("other", hours=2.7, stall_at=2 * H, top1=accuracy),
    }
    checks = [
        (2 * H + 14 * 60, "GNPTrainingStalled", "other"),
        (2 * H + 25 * 60, "GNPTrainingStalled", "other"),
        (2 * H + 34 * 60, "GNPTrainingStalled", "both"),
        (7300, "GNPAccuracyDropped", None),  # 0.04 below the best
        (9100, "GNPAccuracyDropped", "custom"),  # 0.10 below
    ]
    alert_tests = []
    for t, alert, who in checks:
        exp = []
        if who in ("other", "both"):
            exp += fires(alert, "other")
        if who in ("custom", "both"):
            exp += fires(alert, "custom")
        alert_tests.append({"eval_time": _minutes(t), "alertname": alert, "exp_alerts": exp})
    tests = [
        {
            "interval": f"{SCRAPE}s",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": alert_tests,
        }
    ]
    out = _promtool(tmp_path, [default, own], tests)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]


# ---------------------------------------------------------------- a real Prometheus, a real run

JOB = "gnp-alerts"
STALLED = "GNPTrainingStalled"
JOB_LABEL = "training.kubeflow.org/job-name"


def _rank_pids(root_pid: int) -> dict[int, int]:
    """{RANK: pid} of the training processes under `root_pid` (their environment names the rank)."""
    found, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            todo.append(c)
            try:
                env = Path(f"/proc/{c}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = c
    return found


def _alerts(prom) -> list[dict]:
    return [a for a in prom.api("alerts")["alerts"] if a["labels"].get("job_name") == JOB]


@pytest.mark.slow
@pytest.mark.dist
def test_stalled_rank_fires_on_real_prometheus(fmnist_small, tmp_path):
    from tests.conftest import cli_env, torchrun_command
    from tests.support.prom import PODMONITOR, PROMETHEUS, Prometheus, free_ports, podmonitor_scrape_configs

    if not Path(PROMETHEUS).is_file():
        pytest.fail(f"{PROMETHEUS} is missing: `make setup` installs Debian's prometheus package")
    # The rule exactly as a user renders it, with test-sized thresholds for a 1 s scrape interval.
    # The checkpoint-age and input-bound alerts are out of this test's scope (promtool unit tests cover them):
    # their thresholds are set where they cannot fire, because a loaded machine stretches an epoch (the
    # checkpoint interval here) past 3x its usual length and then GNPCheckpointStale went pending in the
    # healthy window.
    overrides = ["scrape_interval=1s", "stall_floor=4s", "stall_factor=3", "pending=1s"]
    overrides += ["checkpoint_stale_factor=1000", "data_wait_fraction=0.99"]
    job = load_job("fashion-mnist-demo", name=JOB, spec_overrides=[f"alerts.{o}" for o in overrides])
    rule = _rule_of([d for d in yaml.safe_load_all(render(job, "monitoring")) if d])
    assert rule["metadata"]["name"] == f"gnp-training-alerts-{JOB}"
    rules_path = tmp_path / "rules.yml"
    rules_path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))

    base = free_ports(2)
    pods = [
        {
            "namespace": NS,
            "name": f"{JOB}-master-0",
            "node": "node-a",
            "container": "pytorch",
            "labels": {JOB_LABEL: JOB},
            "ports": {f"metrics-{r}": f"127.0.0.1:{base + r}" for r in range(2)},
        }
    ]
    scrape = podmonitor_scrape_configs(yaml.safe_load(PODMONITOR.read_text()), pods, interval="1s")
    prom = Prometheus(tmp_path / "prom", free_ports(1), scrape)
    # The helper's config has no rule_files: add them and reload (Prometheus rereads its config on SIGHUP).
    config_path = tmp_path / "prom" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    config["rule_files"] = [str(rules_path)]
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = open(tmp_path / "torchrun.log", "w")
    proc = None
    try:
        prom.wait_ready()
        prom.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not prom.api("rules")["groups"]:
            assert time.monotonic() < deadline, f"rules not loaded:\n{prom.log_tail()}"
            time.sleep(0.2)
        cmd = torchrun_command("-m", "trainer", "train", "--recipe", "debug-cpu")
        for s in (
            f"data.path={fmnist_small}",
            f"run.dir={tmp_path / 'run'}",
            "loop.epochs=200",
            "loop.log_every=1",
            "metrics.prometheus=true",
            f"metrics.port={base}",
            "metrics.addr=127.0.0.1",
            f"metrics.job={JOB}",
            "metrics.progress=lines",
        ):
            cmd += ["--set", s]
        # own session: the whole torchrun tree is ended by its process-group id
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

        def steps() -> dict[str, float]:
            return {r["metric"]["rank"]: r["value"] for r in prom.query(f'gnp_steps_total{{job_name="{JOB}"}}')}

        # Healthy: both ranks stepping for 12 s of rule evaluations, with no alert pending or firing.
        deadline = time.monotonic() + 120
        while len(steps()) < 2 or min(steps().values()) < 20:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.log").read_text()[-3000:]
            time.sleep(0.5)
        healthy_until = time.monotonic() + 12
        while time.monotonic() < healthy_until:
            assert _alerts(prom) == [], _alerts(prom)
            time.sleep(0.5)
        before = steps()

        # Stop rank 1: rank 0 blocks in the next collective and its counter stops rising, while its endpoint
        # keeps serving. Rank 1's endpoint stops answering (the whole process is stopped), so its series go
        # stale and only rank 0 can be reported.
        pids = _rank_pids(proc.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGSTOP)
        t_stop = time.monotonic()
        firing: list[dict] = []
        while time.monotonic() < t_stop + 45 and not any(a["labels"]["alertname"] == STALLED for a in firing):
            firing = [a for a in _alerts(prom) if a["state"] == "firing"]
            time.sleep(0.5)
        took = time.monotonic() - t_stop
        names = sorted(a["labels"]["alertname"] for a in firing)
        assert STALLED in names, f"not firing within 45 s; alerts: {_alerts(prom)}; steps {before} -> {steps()}"
        assert names == [STALLED], firing
        firing = [a for a in firing if a["labels"]["alertname"] == STALLED]
        alert = firing[0]
        assert alert["labels"]["rank"] == "0" and alert["labels"]["namespace"] == NS
        assert alert["labels"]["severity"] == "critical" and alert["labels"]["pod"] == f"{JOB}-master-0"
        summary = alert["annotations"]["summary"]
        assert re.match(rf"{NS}/{JOB} rank 0: no optimizer step for \d", summary), summary
        assert f"make logs JOB={JOB} NAMESPACE={NS}" in alert["annotations"]["runbook"]
        print(f"GNPTrainingStalled firing {took:.1f} s after SIGSTOP (also firing: {names})")
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # SIGKILL: a stopped process does not act on SIGTERM
            proc.wait(timeout=30)
        log.close()
        prom.stop()


if __name__ == "__main__":
    RULE_FILE.write_text(default_alert_rule_text())
    print(f"wrote {RULE_FILE.relative_to(ROOT)}")
