"""The PrometheusRule of alerts, as data: one row of ALERTS per alert, rendered by render_alert_rule.

The committed k8s/monitoring/prometheusrule.yaml is the rule for every job with the default thresholds
(thresholds.py); a job whose spec sets `alerts:` renders its own rule for its job_name, which the cluster-wide
rule then skips.

A row's texts are templates: `{key}` or `{key:format}` (Python's format spec) is replaced by the threshold
`key` or by a value of _context (metric selectors, the stall expression's parts, the runbook commands);
anything else, Prometheus's own `{{ $labels.x }}` and the PromQL label matchers included, stays as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import UserError
from .pod import meta
from .spec import K8S_DIR, ROOT, JobSpec
from .thresholds import alert_thresholds, promdur, seconds

ALERT_RULE_FILE = K8S_DIR / "monitoring" / "prometheusrule.yaml"
ALERT_RULE_NAME = "gnp-training-alerts"
# A job rendered with its own `alerts:` thresholds gets its own rule, which also records this series for its
# job_name; the cluster-wide rule skips those jobs (`unless on (job_name)`), so no alert pages twice.
ALERT_OVERRIDE_SERIES = "gnp:alert_overrides"
# Longest look-back of the stall alert: a process that has not stepped within it is measured from its start.
STALL_LOOKBACK = "6h"
RULE_LABELS = {
    "app.kubernetes.io/name": "gnp-trainer",
    "app.kubernetes.io/component": "monitoring",
    # kube-prometheus-stack's ruleSelector (ruleSelectorNilUsesHelmValues) needs it, as the PodMonitor
    "release": "kube-prometheus-stack",
}
# The metrics the rows use, by the name the templates give them (each selected by job_name).
METRICS = {
    "steps": "gnp_steps_total",
    "step_seconds": "gnp_step_duration_seconds_sum",
    "data_wait": "gnp_data_wait_seconds_total",
    "start": "gnp_process_start_time_seconds",
    "loss": "gnp_train_loss",
    "g1": "gnp_grad_norm_g1",
    "scaler_skipped": "gnp_scaler_skipped_steps_total",
    "ckpt": "gnp_checkpoint_last_success_timestamp_seconds",
    "ckpt_failures": "gnp_checkpoint_failures_total",
    "acc": "gnp_eval_top1_accuracy",
}
DCGM = (
    'label_replace(label_replace(DCGM_FI_DEV_GPU_UTIL, "pod", "$1", "exported_pod", "(.+)"), '
    '"namespace", "$1", "exported_namespace", "(.+)")'
)
WHO = "{{ $labels.namespace }}/{{ $labels.job_name }} rank {{ $labels.rank }}"
MAKE = "make status JOB={{ $labels.job_name }} NAMESPACE={{ $labels.namespace }}"
LOGS = "make logs JOB={{ $labels.job_name }} NAMESPACE={{ $labels.namespace }}"


@dataclass(frozen=True)
class Alert:
    """One alert: its templates (module doc) and the thresholds it reads (all set, or the alert is off)."""

    name: str
    severity: str
    keys: tuple[str, ...]
    expr: str
    pending: str  # `for:`
    summary: str
    description: str
    runbook: str


ALERTS: tuple[Alert, ...] = (
    Alert(
        "GNPTrainingStalled",
        "critical",
        ("stall_factor", "stall_floor", "scrape_interval", "pending"),
        "(\n  ({since_step})\n  < ({age})\n  or ({age})\n)\n"
        "> (\n  ({stall_factor} * {gap} > {floor:g})\n  or ({steps} * 0 + {floor:g})\n)",
        "{pending}",
        "{who}: no optimizer step for {{ $value | humanizeDuration }}",
        "The step counter has not risen for longer than max({stall_floor}, {stall_factor} x the job's usual gap "
        "between steps) while the process is up: a hung collective (a lost or stopped peer), a blocked data path "
        "or a deadlock. The GPUs stay allocated until activeDeadlineSeconds.",
        "Look for the rank that stopped (its endpoint down, or its last log line): `{logs}`, `{make}`; "
        "py-spy dump --pid <rank pid> in the pod. Delete the job if it does not recover: "
        "make delete JOB={{ $labels.job_name }} NAMESPACE={{ $labels.namespace }}",
    ),
    Alert(
        "GNPLossNotFinite",
        "critical",
        ("pending",),
        "{loss} * 0 != 0",  # x * 0 != 0 holds exactly for NaN and +-Inf
        "{pending}",
        "{who}: training loss is not finite",
        "The cross-entropy at the last log step is NaN or infinite: the run diverged and every further step "
        "wastes the GPUs.",
        "Check lr, r/alpha and AMP in the recipe; `{logs}`; resume from the last good checkpoint with a "
        "lower learning rate.",
    ),
    Alert(
        # fp16's GradScaler skips a step whose gradients overflowed; a few are normal while the scale adapts,
        # most of them means the weights no longer move
        "GNPScalerSkippingSteps",
        "critical",
        ("scaler_window", "scaler_skip_fraction", "pending"),
        "increase({scaler_skipped}[{scaler_window}])\n> {scaler_skip_fraction} * increase({steps}[{scaler_window}])\n"
        "and increase({steps}[{scaler_window}]) > 0",
        "{pending}",
        "{who}: the fp16 GradScaler skipped {{ $value | humanize }} steps in {scaler_window}",
        "More than {scaler_skip_fraction} of the steps of the last {scaler_window} were skipped for inf/NaN "
        "gradients: the weights barely move while the GPUs stay busy.",
        "Dashboard 'Loss at θ and θ+ε'; try loop.precision=bf16 (no scaler) or a lower lr; `{logs}`.",
    ),
    Alert(
        "GNPGradNormExploding",
        "warning",
        ("explode_factor_g1", "explode_window", "pending"),
        "{g1}\n> {explode_factor_g1} * quantile_over_time(0.5, {g1}[{explode_window}])",
        "{pending}",
        "{who}: ||g1|| is {{ $value | humanize }}, over {explode_factor_g1}x its recent median",
        "The penalized gradient norm exceeds {explode_factor_g1} x its median over the last {explode_window}: "
        "the GNP step is about to diverge.",
        "Dashboard row 'GNP optimization' (gradient norms, sharpness); lower lr or r; `{logs}`.",
    ),
    Alert(
        "GNPLossExploding",
        "warning",
        ("explode_factor_loss", "explode_window", "pending"),
        "{loss}\n> {explode_factor_loss} * quantile_over_time(0.5, {loss}[{explode_window}])",
        "{pending}",
        "{who}: loss is {{ $value | humanize }}, over {explode_factor_loss}x its recent median",
        "The training loss exceeds {explode_factor_loss} x its median over the last {explode_window}.",
        "Dashboard 'Loss at θ and θ+ε' and 'Learning rate' (a warmup or schedule error?); `{logs}`.",
    ),
    Alert(
        "GNPTrainingRestarting",
        "warning",
        ("restarts_window", "max_restarts"),
        "changes(max by (namespace, job_name, rank) ({start0})[{restarts_window}:])\n> {max_restarts}",
        "0s",
        "{who}: restarted {{ $value }} times in {restarts_window}",
        "More than {max_restarts} new training processes within {restarts_window} (torchrun group restarts and "
        "recreated pods both count): the job crash-loops and will keep its GPUs until its deadline.",
        "`{logs}` for the traceback, `{make}` for pod events (OOMKilled, Xid, evictions).",
    ),
    Alert(
        "GNPCheckpointUploadFailing",
        "critical",
        ("checkpoint_failing_for",),
        "increase({ckpt_failures}[{checkpoint_failing_for}]) > 0\nand (time() - ({ckpt} or {start0})) > {failing_s:g}",
        "0s",
        "{who}: checkpoint uploads failing for over {checkpoint_failing_for}",
        "Checkpoint saves or uploads failed and none succeeded for {checkpoint_failing_for}: a restart now "
        "would lose that much training.",
        "`{logs}` (search 'checkpoint'); check the S3 secret, endpoint and bucket quota.",
    ),
    Alert(
        "GNPCheckpointStale",
        "warning",
        ("checkpoint_stale_factor", "pending"),
        # the mean gap between successes over the last 12h (needs two of them)
        "time() - {ckpt}\n> {checkpoint_stale_factor} * (max_over_time({ckpt}[12h]) - "
        "min_over_time({ckpt}[12h])) / changes({ckpt}[12h])",
        "{pending}",
        "{who}: last checkpoint {{ $value | humanizeDuration }} ago",
        "The last successful checkpoint is older than {checkpoint_stale_factor} x the job's usual interval "
        "between checkpoints.",
        "Is the job stepping (GNPTrainingStalled)? `{logs}`; check the checkpoint URI and credentials.",
    ),
    Alert(
        "GNPInputBound",
        "warning",
        ("data_wait_for", "data_wait_fraction"),
        "rate({data_wait}[{data_wait_for}]) > {data_wait_fraction}",
        "0s",
        "{who}: {{ $value | humanizePercentage }} of the time waiting for data",
        "Over the last {data_wait_for} the rank waited for its data loader more than {data_wait_fraction:.0%} "
        "of the wall time: the GPUs idle on the input pipeline.",
        "Dashboard 'Data-loader wait'; raise data.workers / cpu requests, check the dataset volume, `make bench-data`.",
    ),
    Alert(
        "GNPGPUsIdle",
        "warning",
        ("gpu_idle_percent", "gpu_idle_for"),
        "((avg by (namespace, pod) ({dcgm}) < {gpu_idle_percent})\n"
        "* on (namespace, pod) group_left (job_name) group by (namespace, pod, job_name) ({start}))",
        "{gpu_idle_for}",
        "{{ $labels.namespace }}/{{ $labels.job_name }} pod {{ $labels.pod }}: GPUs {{ $value | humanize }}% busy",
        "DCGM utilization of the pod's GPUs averaged below {gpu_idle_percent}% for {gpu_idle_for} while the job runs.",
        "Input-bound or stalled? See those alerts and the dashboard's GPU row; `{logs}`.",
    ),
    Alert(
        "GNPAccuracyDropped",
        "warning",
        ("accuracy_drop", "accuracy_window"),  # accuracy_drop is None by default: the alert is off
        "max_over_time({acc}[{accuracy_window}]) - {acc} > {accuracy_drop}",
        "0s",
        "{who}: top-1 accuracy {{ $value | humanizePercentage }} below its best",
        "Validation top-1 fell more than {accuracy_drop} below its best of the last {accuracy_window}.",
        "Dashboard 'Validation accuracy'; `{logs}`; consider stopping and keeping the best checkpoint.",
    ),
)

PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)(?::([^{}]*))?\}")


def fill(template: str, values: dict[str, Any]) -> str:
    """The template with every `{key}` / `{key:format}` of `values` replaced (format(value, spec))."""

    def one(m: re.Match) -> str:
        return format(values[m.group(1)], m.group(2) or "") if m.group(1) in values else m.group(0)

    return PLACEHOLDER.sub(one, template)


def _context(t: dict[str, Any], job: str | None) -> dict[str, Any]:
    """What the templates refer to besides the thresholds: metric selectors and the stall expression's parts."""
    sel = f'job_name="{job}"' if job else 'job_name!=""'
    ctx: dict[str, Any] = {key: f"{metric}{{{sel}}}" for key, metric in METRICS.items()}
    ctx["start0"] = f'gnp_process_start_time_seconds{{{sel}, rank="0"}}'  # rank 0 saves; all ranks restart together
    lb = STALL_LOOKBACK
    # The usual gap between two rises of the step counter, from the job's own history: seconds spent stepping
    # or waiting for data (evaluation and checkpoint pauses excluded) per observed rise. Stalls do not inflate
    # it (both sides stop growing), and it covers log_every and the scrape interval.
    ctx["gap"] = (
        f"(increase({ctx['step_seconds']}[{lb}]) + increase({ctx['data_wait']}[{lb}]))\n"
        f"  / changes({ctx['steps']}[{lb}])"
    )
    # Seconds since the counter last rose (to within the window w: at least 2 scrapes, so increase() sees a
    # step), never more than the process's age.
    w = promdur(4 * seconds(t["scrape_interval"]))
    ctx["since_step"] = f"time() - max_over_time((timestamp(increase({ctx['steps']}[{w}]) > 0))[{lb}:])"
    ctx["age"] = f"time() - {ctx['start']}"
    ctx["floor"] = seconds(t["stall_floor"])
    ctx["failing_s"] = seconds(t["checkpoint_failing_for"])
    ctx.update(dcgm=DCGM, who=WHO, make=MAKE, logs=LOGS)
    return ctx


def render_alert_rule(thresholds: dict[str, Any], job: str | None = None, namespace: str | None = None) -> dict:
    """The PrometheusRule: for every GNP job (job=None) or only for `job` (its own thresholds).

    Every alert keeps the labels namespace, job_name and rank (GPU idle: pod) for its summary, and carries
    severity plus a runbook annotation (what to look at, which make command).
    """
    values = {**_context(thresholds, job), **thresholds}
    skip = "" if job else f"\nunless on (job_name) {ALERT_OVERRIDE_SERIES}"
    rules: list[dict] = [
        {
            "alert": a.name,
            "expr": fill(a.expr, values) + skip + "\n",
            "for": fill(a.pending, values),
            "labels": {"severity": a.severity},
            "annotations": {k: fill(getattr(a, k), values) for k in ("summary", "description", "runbook")},
        }
        for a in ALERTS
        if all(thresholds[k] is not None for k in a.keys)
    ]
    if job:
        rules.append({"record": ALERT_OVERRIDE_SERIES, "expr": "vector(1)", "labels": {"job_name": job}})
    name = f"{ALERT_RULE_NAME}-{job}" if job else ALERT_RULE_NAME
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": meta(name, namespace, RULE_LABELS),
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
    """A PrometheusRule as YAML, its PromQL in literal blocks."""
    return yaml.dump(doc, Dumper=_RuleDumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)


def alert_rule_doc(job: JobSpec) -> str:
    """The monitoring part's rule: the committed cluster-wide file, or the job's own when it sets `alerts:`."""
    if job.alerts is None:
        if not ALERT_RULE_FILE.is_file():
            raise UserError(f"{ALERT_RULE_FILE.relative_to(ROOT)} is missing")
        return ALERT_RULE_FILE.read_text()
    return rule_yaml(render_alert_rule(job.alerts, job.name, job.namespace))
