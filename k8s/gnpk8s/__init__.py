"""Kubernetes tooling of the GNP trainer, one job per module:

    spec.py        the job spec: JobSpec (typed, documented), read with trainer.config's strict YAML loader
    pod.py         what every pod of a job shares: container, env, volumes, security, QoS, scheduling
    pytorchjob.py  the kubeflow.org/v1 PyTorchJob built from a JobSpec (one module per job kind: a second
                   kind, e.g. Kubeflow Trainer v2's TrainJob, adds its own module and a KINDS entry)
    convert.py     the batch/v1 Job that converts the dataset
    monitoring.py  PodMonitor, the Grafana dashboard ConfigMap, the PrometheusRule (alert thresholds)
    manifests.py   render(spec, part): the YAML text of one part, dispatching on the job kind
    trainjob.py    the Kubeflow Trainer v2 TrainJob and its namespaced TrainingRuntime (owned by the TrainJob)
    kueue.py       which Kueue LocalQueue a job goes to, and submit's check that Kueue made its Workload
    cluster.py     submit / status / logs / delete with the kubernetes client
    cli.py         the command line behind `python k8s/render.py` and the make targets

k8s/render.py stays the script the Makefile runs and re-exports the public names for older callers. Nothing
here imports torch or the trainer package at import time (the light client: kubernetes + PyYAML only).
"""
