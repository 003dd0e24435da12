"""Monitoring manifests: the PodMonitor (k8s/monitoring/podmonitor.yaml, verbatim), the Grafana dashboard
ConfigMap rendered from k8s/monitoring/dashboard.json, and the PrometheusRule of alerts (the committed
k8s/monitoring/prometheusrule.yaml for every job, or a job's own with the thresholds of its `alerts:`)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .pod import meta as _meta
from .spec import K8S_DIR, ROOT, JobSpec, Reader

MONITORING_DIR = K8S_DIR / "monitoring"
MONITORING_FILES = ("podmonitor.yaml",)  # applied verbatim
DASHBOARD_FILE = MONITORING_DIR / "dashboard.json"  # rendered into the Grafana sidecar's ConfigMap
DASHBOARD_KEY = "gnp-training.json"  # the file name the sidecar writes into Grafana's dashboard folder


def monitoring_texts(namespace: str | None = None) -> list[str]:
    """k8s/monitoring/podmonitor.yaml (comments kept), placed in `namespace` and selecting only it when one is
    given, then the dashboard ConfigMap rendered from dashboard.json (apply them once per namespace)."""
    out = []
    for fname in MONITORING_FILES:
        path = MONITORING_DIR / fname
        if not path.is_file():
            raise UserError(f"{path.relative_to(ROOT)} is missing")
        out.append(_in_namespace(path.read_text(), namespace) if namespace else path.read_text())
    out.append(dashboard_configmap())
    return out


def _in_namespace(text: str, namespace: str) -> str:
    """The PodMonitor text in `namespace`, selecting pods there only (namespaceSelector.matchNames): a
    tenant's monitor, not `any: true`, which reads every namespace's pods."""
    name_line = "  name: gnp-training\n"
    spec_line = "spec:\n"
    if name_line not in text or spec_line not in text:
        raise UserError("k8s/monitoring/podmonitor.yaml: expected `  name: gnp-training` and `spec:` lines")
    text = text.replace(name_line, f"{name_line}  namespace: {namespace}\n", 1)
    return text.replace(spec_line, f"{spec_line}  namespaceSelector:\n    matchNames: [{namespace}]\n", 1)


def dashboard_configmap(path: Path | None = None) -> str:
    """The ConfigMap that Grafana's dashboard sidecar imports, carrying dashboard.json byte for byte.

    A YAML literal block keeps the JSON readable in `kubectl get -o yaml` and diffs; its chomping indicator
    is chosen so that the loaded value ends exactly as the file does.
    """
    path = path or DASHBOARD_FILE  # read at call time: tests point it elsewhere
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if not path.is_file():
        raise UserError(f"{where} is missing")
    text = path.read_text()
    try:
        dash = json.loads(text)
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON ({e}); expected a Grafana dashboard model") from None
    if not isinstance(dash, dict) or "panels" not in dash:
        raise UserError(f"{where}: expected a Grafana dashboard model (a JSON object with `panels`)")
    stripped = text.rstrip("\n")
    chomp = "-" if stripped == text else ("" if stripped + "\n" == text else "+")
    body = "".join(f"    {line}\n" if line else "\n" for line in stripped.split("\n"))
    body += "\n" * (len(text) - len(stripped) - 1)  # the newlines beyond one, kept by "+"
    return (
        f"# Rendered from {where} by k8s/render.py (--part monitoring); edit the JSON, not this.\n"
        "# Grafana's dashboard sidecar (kube-prometheus-stack grafana.sidecar.dashboards: label\n"
        '# grafana_dashboard, labelValue "1") imports it. Apply it in Grafana\'s namespace unless the\n'
        "# sidecar's searchNamespace is ALL.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: gnp-training-dashboard\n"
        "  labels:\n"
        '    grafana_dashboard: "1"\n'
        "    app.kubernetes.io/name: gnp-trainer\n"
        "    app.kubernetes.io/component: monitoring\n"
        "data:\n"
        f"  {DASHBOARD_KEY}: |{chomp}\n" + body
    )


def podmonitor_ports() -> list[str] | None:
    """Port names the PodMonitor scrapes (None when the file is absent)."""
    path = MONITORING_DIR / "podmonitor.yaml"
    if not path.is_file():
        return None
    doc = yaml.safe_load(path.read_text())
    return [str(e.get("port")) for e in doc.get("spec", {}).get("podMetricsEndpoints", []) if e.get("port")]


# ---------------------------------------------------------------------------------------------------
# Alerts: the PrometheusRule of k8s/monitoring/prometheusrule.yaml (thresholds from the spec's `alerts:`)

ALERT_RULE_FILE = "prometheusrule.yaml"
ALERT_RULE_NAME = "gnp-training-alerts"
# A job rendered with its own `alerts:` thresholds gets its own rule, which also records this series for its
# job_name; the cluster-wide rule skips those jobs (`unless on (job_name)`), so no alert pages twice.
ALERT_OVERRIDE_SERIES = "gnp:alert_overrides"
# Longest look-back of the stall alert: a process that has not stepped within it is measured from its start.
STALL_LOOKBACK = "6h"

# key: (default, kind, meaning). Durations are Prometheus durations (30s, 10m, 1h); None = alert off.
ALERT_DEFAULTS: dict[str, tuple[Any, str, str]] = {
    "scrape_interval": ("15s", "duration", "the PodMonitor's interval; 4x it is the window that detects a step"),
    "pending": ("2m", "duration", "`for:` of the stall, loss, scaler, explosion and checkpoint-age alerts"),
    "stall_factor": (5, "number", "stalled: no step for stall_factor x the job's usual gap between steps"),
    "stall_floor": ("10m", "duration", "stalled: but never less than this (evaluation, checkpoints, startup)"),
    "scaler_skip_fraction": (0.5, "ratio", "GradScaler: share of the steps in scaler_window it skipped"),
    "scaler_window": ("30m", "duration", "GradScaler: over this window"),
    "explode_factor_g1": (10, "number", "exploding: ||g1|| above this x its median over explode_window"),
    "explode_factor_loss": (4, "number", "exploding: the loss above this x its median over explode_window"),
    "explode_window": ("1h", "duration", "exploding: the history the median is taken over"),
    "max_restarts": (3, "count", "restarts: more than this many new training processes of rank 0"),
    "restarts_window": ("1h", "duration", "restarts: within this window"),
    "checkpoint_failing_for": ("1h", "duration", "checkpoints: failures and no success for this long"),
    "checkpoint_stale_factor": (3, "number", "checkpoints: last success older than this x the usual interval"),
    "data_wait_fraction": (0.3, "ratio", "input-bound: share of wall time waiting for the data loader"),
    "data_wait_for": ("15m", "duration", "input-bound: averaged over this window"),
    "gpu_idle_percent": (10, "percent", "GPUs idle: DCGM utilization of the pod's GPUs below this"),
    "gpu_idle_for": ("15m", "duration", "GPUs idle: for this long"),
    "accuracy_drop": (None, "ratio", "accuracy: top-1 below its best by more than this (off by default)"),
    "accuracy_window": ("3d", "duration", "accuracy: the best is taken over this window"),
}
_DURATION = re.compile(r"([0-9]+)(ms|s|m|h|d|w)")
_DURATION_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def alert_thresholds(reader: Reader | None) -> dict[str, Any]:
    """ALERT_DEFAULTS overridden by the spec's `alerts:` mapping (one-line UserError on a bad key or value)."""
    out = {k: v[0] for k, v in ALERT_DEFAULTS.items()}
    if reader is None:
        return out
    reader.check_unknown(ALERT_DEFAULTS)
    for key, (_, kind, _) in ALERT_DEFAULTS.items():
        if key not in reader.data:
            continue
        value, full = reader.data[key], f"{reader.where}: {reader.prefix}{key}"
        if value is None and key == "accuracy_drop":
            out[key] = None
        elif kind == "duration":
            if not isinstance(value, str) or not _DURATION.fullmatch(value) or _seconds(value) <= 0:
                raise UserError(f"{full}: expected a Prometheus duration such as 30s, 10m or 1h, got {value!r}")
            out[key] = value
        else:
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = {
                "number": number and value > 0,
                "ratio": number and 0 < value < 1,
                "percent": number and 0 < value <= 100,
                "count": number and isinstance(value, int) and value >= 0,
            }[kind]
            if not ok:
                allowed = {
                    "number": "a number > 0",
                    "ratio": "a number between 0 and 1 (exclusive)",
                    "percent": "a number in (0, 100]",
                    "count": "an integer >= 0",
                }[kind]
                raise UserError(f"{full}: expected {allowed}, got {value!r}")
            out[key] = value
    return out


def _seconds(duration: str) -> float:
    m = _DURATION.fullmatch(duration)
    return int(m.group(1)) * _DURATION_S[m.group(2)]


def _promdur(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms" if seconds < 1 or seconds != int(seconds) else f"{int(seconds)}s"


def render_alert_rule(thresholds: dict[str, Any], job: str | None = None, namespace: str | None = None) -> dict:
    """The PrometheusRule: for every GNP job (job=None) or only for `job` (its own thresholds).

    Every alert keeps the labels namespace, job_name and rank (GPU idle: pod) for its summary, and carries
    severity plus a runbook annotation (what to look at, which make command).
    """
    t = thresholds
    sel = f'job_name="{job}"' if job else 'job_name!=""'
    skip = "" if job else f"\nunless on (job_name) {ALERT_OVERRIDE_SERIES}"
    w = _promdur(4 * _seconds(t["scrape_interval"]))  # at least 2 scrapes, so increase() sees a step
    floor = _seconds(t["stall_floor"])
    who = "{{ $labels.namespace }}/{{ $labels.job_name }} rank {{ $labels.rank }}"
    make = "make status JOB={{ $labels.job_name }} NAMESPACE={{ $labels.namespace }}"
    logs = "make logs JOB={{ $labels.job_name }} NAMESPACE={{ $labels.namespace }}"

    def m(name: str, extra: str = "") -> str:
        return f"{name}{{{sel}{', ' + extra if extra else ''}}}"

    # The usual gap between two rises of the step counter, from the job's own history: seconds spent stepping
    # or waiting for data (evaluation and checkpoint pauses excluded) per observed rise. Stalls do not inflate
    # it (both sides stop growing), and it covers log_every and the scrape interval.
    gap = (
        f"(increase({m('gnp_step_duration_seconds_sum')}[{STALL_LOOKBACK}]) "
        f"+ increase({m('gnp_data_wait_seconds_total')}[{STALL_LOOKBACK}]))\n"
        f"  / changes({m('gnp_steps_total')}[{STALL_LOOKBACK}])"
    )
    # Seconds since the counter last rose (to within the window w), never more than the process's age.
    since_step = f"time() - max_over_time((timestamp(increase({m('gnp_steps_total')}[{w}]) > 0))[{STALL_LOOKBACK}:])"
    age = f"time() - {m('gnp_process_start_time_seconds')}"
    stall_expr = (
        f"(\n  ({since_step})\n  < ({age})\n  or ({age})\n)\n"
        f"> (\n  ({t['stall_factor']} * {gap} > {floor:g})\n  or ({m('gnp_steps_total')} * 0 + {floor:g})\n)"
    )
    ckpt = m("gnp_checkpoint_last_success_timestamp_seconds")
    start0 = m("gnp_process_start_time_seconds", 'rank="0"')  # rank 0 saves; all ranks restart together
    dcgm = (
        'label_replace(label_replace(DCGM_FI_DEV_GPU_UTIL, "pod", "$1", "exported_pod", "(.+)"), '
        '"namespace", "$1", "exported_namespace", "(.+)")'
    )
    alerts = [
        (
            "GNPTrainingStalled",
            "critical",
            stall_expr,
            t["pending"],
            f"{who}: no optimizer step for {{{{ $value | humanizeDuration }}}}",
            f"The step counter has not risen for longer than max({t['stall_floor']}, {t['stall_factor']} x the "
            f"job's usual gap between steps) while the process is up: a hung collective (a lost or stopped peer), "
            f"a blocked data path or a deadlock. The GPUs stay allocated until activeDeadlineSeconds.",
            f"Look for the rank that stopped (its endpoint down, or its last log line): `{logs}`, `{make}`; "
            f"py-spy dump --pid <rank pid> in the pod. Delete the job if it does not recover: "
            f"make delete JOB={{{{ $labels.job_name }}}} NAMESPACE={{{{ $labels.namespace }}}}",
        ),
        (
            "GNPLossNotFinite",
            "critical",
            # x * 0 != 0 holds exactly for NaN and +-Inf
            f"{m('gnp_train_loss')} * 0 != 0",
            t["pending"],
            f"{who}: training loss is not finite",
            "The cross-entropy at the last log step is NaN or infinite: the run diverged and every further step "
            "wastes the GPUs.",
            f"Check lr, r/alpha and AMP in the recipe; `{logs}`; resume from the last good checkpoint with a "
            f"lower learning rate.",
        ),
        (
            "GNPScalerSkippingSteps",
            "critical",
            # fp16's GradScaler skips a step whose gradients overflowed; a few are normal while the scale adapts,
            # most of them means the weights no longer move
            f"increase({m('gnp_scaler_skipped_steps_total')}[{t['scaler_window']}])\n"
            f"> {t['scaler_skip_fraction']} * increase({m('gnp_steps_total')}[{t['scaler_window']}])\n"
            f"and increase({m('gnp_steps_total')}[{t['scaler_window']}]) > 0",
            t["pending"],
            f"{who}: the fp16 GradScaler skipped {{{{ $value | humanize }}}} steps in {t['scaler_window']}",
            f"More than {t['scaler_skip_fraction']} of the steps of the last {t['scaler_window']} were skipped "
            "for inf/NaN gradients: the weights barely move while the GPUs stay busy.",
            f"Dashboard 'Loss at θ and θ+ε'; try loop.precision=bf16 (no scaler) or a lower lr; `{logs}`.",
        ),
        (
            "GNPGradNormExploding",
            "warning",
            f"{m('gnp_grad_norm_g1')}\n> {t['explode_factor_g1']} * quantile_over_time(0.5, "
            f"{m('gnp_grad_norm_g1')}[{t['explode_window']}])",
            t["pending"],
            f"{who}: ||g1|| is {{{{ $value | humanize }}}}, over {t['explode_factor_g1']}x its recent median",
            f"The penalized gradient norm exceeds {t['explode_factor_g1']} x its median over the last "
            f"{t['explode_window']}: the GNP step is about to diverge.",
            f"Dashboard row 'GNP optimization' (gradient norms, sharpness); lower lr or r; `{logs}`.",
        ),
        (
            "GNPLossExploding",
            "warning",
            f"{m('gnp_train_loss')}\n> {t['explode_factor_loss']} * quantile_over_time(0.5, "
            f"{m('gnp_train_loss')}[{t['explode_window']}])",
            t["pending"],
            f"{who}: loss is {{{{ $value | humanize }}}}, over {t['explode_factor_loss']}x its recent median",
            f"The training loss exceeds {t['explode_factor_loss']} x its median over the last {t['explode_window']}.",
            f"Dashboard 'Loss at θ and θ+ε' and 'Learning rate' (a warmup or schedule error?); `{logs}`.",
        ),
        (
            "GNPTrainingRestarting",
            "warning",
            f"changes(max by (namespace, job_name, rank) ({start0})[{t['restarts_window']}:])\n> {t['max_restarts']}",
            "0s",
            f"{who}: restarted {{{{ $value }}}} times in {t['restarts_window']}",
            f"More than {t['max_restarts']} new training processes within {t['restarts_window']} (torchrun "
            f"group restarts and recreated pods both count): the job crash-loops and will keep its GPUs until "
            f"its deadline.",
            f"`{logs}` for the traceback, `{make}` for pod events (OOMKilled, Xid, evictions).",
        ),
        (
            "GNPCheckpointUploadFailing",
            "critical",
            f"increase({m('gnp_checkpoint_failures_total')}[{t['checkpoint_failing_for']}]) > 0\n"
            f"and (time() - ({ckpt} or {start0})) > "
            f"{_seconds(t['checkpoint_failing_for']):g}",
            "0s",
            f"{who}: checkpoint uploads failing for over {t['checkpoint_failing_for']}",
            f"Checkpoint saves or uploads failed and none succeeded for {t['checkpoint_failing_for']}: a restart "
            f"now would lose that much training.",
            f"`{logs}` (search 'checkpoint'); check the S3 secret, endpoint and bucket quota.",
        ),
        (
            "GNPCheckpointStale",
            "warning",
            # the mean gap between successes over the last 12h (needs two of them)
            f"time() - {ckpt}\n> {t['checkpoint_stale_factor']} * (max_over_time({ckpt}[12h]) - "
            f"min_over_time({ckpt}[12h])) / changes({ckpt}[12h])",
            t["pending"],
            f"{who}: last checkpoint {{{{ $value | humanizeDuration }}}} ago",
            f"The last successful checkpoint is older than {t['checkpoint_stale_factor']} x the job's usual "
            f"interval between checkpoints.",
            f"Is the job stepping (GNPTrainingStalled)? `{logs}`; check the checkpoint URI and credentials.",
        ),
        (
            "GNPInputBound",
            "warning",
            f"rate({m('gnp_data_wait_seconds_total')}[{t['data_wait_for']}]) > {t['data_wait_fraction']}",
            "0s",
            f"{who}: {{{{ $value | humanizePercentage }}}} of the time waiting for data",
            f"Over the last {t['data_wait_for']} the rank waited for its data loader more than "
            f"{t['data_wait_fraction']:.0%} of the wall time: the GPUs idle on the input pipeline.",
            "Dashboard 'Data-loader wait'; raise data.workers / cpu requests, check the dataset volume, "
            "`make bench-data`.",
        ),
        (
            "GNPGPUsIdle",
            "warning",
            f"(avg by (namespace, pod) ({dcgm}) < {t['gpu_idle_percent']})\n"
            f"* on (namespace, pod) group_left (job_name) group by (namespace, pod, job_name) "
            f"({m('gnp_process_start_time_seconds')})",
            t["gpu_idle_for"],
            "{{ $labels.namespace }}/{{ $labels.job_name }} pod {{ $labels.pod }}: GPUs {{ $value | humanize }}% busy",
            f"DCGM utilization of the pod's GPUs averaged below {t['gpu_idle_percent']}% for "
            f"{t['gpu_idle_for']} while the job runs.",
            f"Input-bound or stalled? See those alerts and the dashboard's GPU row; `{logs}`.",
        ),
    ]
    if t["accuracy_drop"] is not None:
        acc = m("gnp_eval_top1_accuracy")
        alerts.append(
            (
                "GNPAccuracyDropped",
                "warning",
                f"max_over_time({acc}[{t['accuracy_window']}]) - {acc} > {t['accuracy_drop']}",
                "0s",
                f"{who}: top-1 accuracy {{{{ $value | humanizePercentage }}}} below its best",
                f"Validation top-1 fell more than {t['accuracy_drop']} below its best of the last "
                f"{t['accuracy_window']}.",
                f"Dashboard 'Validation accuracy'; `{logs}`; consider stopping and keeping the best checkpoint.",
            )
        )
    rules: list[dict] = []
    for name, severity, expr, pending, summary, description, runbook in alerts:
        rules.append(
            {
                "alert": name,
                "expr": f"{expr}{skip}\n" if not name.startswith("GNPGPUs") else f"({expr}){skip}\n",
                "for": pending,
                "labels": {"severity": severity},
                "annotations": {"summary": summary, "description": description, "runbook": runbook},
            }
        )
    if job:
        rules.append({"record": ALERT_OVERRIDE_SERIES, "expr": "vector(1)", "labels": {"job_name": job}})
    name = f"{ALERT_RULE_NAME}-{job}" if job else ALERT_RULE_NAME
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _meta(
            name,
            namespace,
            {
                "app.kubernetes.io/name": "gnp-trainer",
                "app.kubernetes.io/component": "monitoring",
                # kube-prometheus-stack's ruleSelector (ruleSelectorNilUsesHelmValues) needs it, as the PodMonitor
                "release": "kube-prometheus-stack",
            },
        ),
        "spec": {"groups": [{"name": name, "rules": rules}]},
    }


def default_alert_rule_text() -> str:
    """The committed k8s/monitoring/prometheusrule.yaml: the rule for every job, default thresholds."""
    header = (
        "# GENERATED by k8s/render.py (render_alert_rule with ALERT_DEFAULTS); regenerate with\n"
        "#   .venv/bin/python -m tests.test_alerts\n"
        "# Alerts for every GNP training job (label job_name). A job whose spec sets `alerts:` renders its own\n"
        "# rule (make render JOB=... PART=monitoring), which this one then skips. The `release:` label is what\n"
        "# kube-prometheus-stack's ruleSelector matches (ruleSelectorNilUsesHelmValues), like the PodMonitor's.\n"
    )
    return header + rule_yaml(render_alert_rule(alert_thresholds(None)))


class _RuleDumper(yaml.SafeDumper):
    """Multi-line strings (the PromQL) as literal blocks, readable in the file and in `kubectl get -o yaml`."""


_RuleDumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def rule_yaml(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_RuleDumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)


def alert_rule_doc(job: JobSpec) -> str:
    """The monitoring part's rule: the committed cluster-wide file, or the job's own when it sets `alerts:`."""
    if job.alerts is None:
        path = MONITORING_DIR / ALERT_RULE_FILE
        if not path.is_file():
            raise UserError(f"{path.relative_to(ROOT)} is missing")
        return path.read_text()
    return rule_yaml(render_alert_rule(job.alerts, job.name, job.namespace))
