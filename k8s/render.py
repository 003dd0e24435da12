#!/usr/bin/env python3
"""Kubernetes tooling for the GNP trainer: `python k8s/render.py --help` (the make targets run it).

The code lives in the package k8s/gnpk8s/ (one job per module: spec, pod, pytorchjob, convert, monitoring,
manifests, cluster, cli). This script puts k8s/ on sys.path, runs the CLI, and re-exports the names that
callers of the former single module use (tests, tools).
"""

from __future__ import annotations

import sys
from pathlib import Path

# k8s/ for the package (when loaded by path rather than run as a script), and the repository root so that
# this checkout's trainer/ is the one imported (its config loader checks the pod's arguments).
for _path in (str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gnpk8s.cli import main  # noqa: E402
from gnpk8s.cluster import Cluster, connect, delete, logs, status_text, submit  # noqa: E402,F401
from gnpk8s.convert import build as render_convert_job  # noqa: E402,F401
from gnpk8s.errors import EXIT_USER, UserError  # noqa: E402,F401
from gnpk8s.manifests import dump, render  # noqa: E402,F401
from gnpk8s.monitoring import (  # noqa: E402,F401
    ALERT_DEFAULTS,
    alert_rule_doc,
    alert_thresholds,
    dashboard_configmap,
    default_alert_rule_text,
    monitoring_texts,
    podmonitor_ports,
    render_alert_rule,
    rule_yaml,
)
from gnpk8s.pytorchjob import build as render_pytorchjob  # noqa: E402,F401
from gnpk8s.pytorchjob import rank0_pod  # noqa: E402,F401
from gnpk8s.spec import SPEC_DOC, JobSpec, check_name, list_jobs, load_job, load_spec, spec_path  # noqa: E402,F401

build_job = load_job  # the former name

if __name__ == "__main__":
    sys.exit(main())
