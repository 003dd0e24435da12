"""Kubernetes tooling of the GNP trainer (the package gnpk8s, installed with the project: `pip install -e .`;
the light client .venv-k8s: `pip install --no-deps -e .`), one job per module:

    errors.py      UserError and the exit statuses
    thresholds.py  the alert thresholds a spec may set (`alerts:`), their defaults and checks
    spec.py        the job spec: JobSpec (typed, documented), read with trainer.config's strict YAML loader
    pod.py         what every pod of a job shares: container, env, volumes, security, QoS, scheduling
    cluster.py     what every kind shares on a cluster: connection, API calls, CRD/Secret checks, pods, logs
    kueue.py       which Kueue LocalQueue a job goes to, and submit's check that Kueue made its Workload
    pytorchjob.py  the job kind kubeflow.org/v1 PyTorchJob: render, submit, status, logs, delete
    trainjob.py    the job kind Kubeflow Trainer v2 TrainJob (+ its namespaced TrainingRuntime): the same five
    kinds.py       the JobKind protocol and the registry KINDS (adding a kind: one module, one line there)
    convert.py     the batch/v1 Job that converts the dataset
    monitoring.py  PodMonitor and the Grafana dashboard ConfigMap
    alerts.py      the PrometheusRule, rendered from the ALERTS table
    manifests.py   render(spec, part): the YAML text of one part, dispatching on the job kind
    cli.py         the command line behind `python k8s/render.py` and the make targets

Each module imports only modules above it in this list, function-level imports included (no cycles:
tests/test_train.py, test_no_import_cycles). Nothing here imports torch or the trainer package at import time
(the light client: kubernetes + PyYAML only); spec.py imports trainer.config when it reads a spec.
"""
