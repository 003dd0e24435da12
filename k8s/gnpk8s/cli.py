"""The command line behind `python k8s/render.py` (and make jobs/render/submit/status/logs/delete).

    python k8s/render.py jobs                          list the job specs in k8s/jobs/
    python k8s/render.py render JOB [options]          print the manifest (no cluster needed)
    python k8s/render.py submit JOB [options]          render, then create it with the kubernetes client
    python k8s/render.py status NAME [-n NS] [--watch S]  state, Kueue, waiting pods, progress, last failure
    python k8s/render.py logs NAME [-n NS] [--follow] [--rank R] [--previous] [--wait S]
                                                       the rank-0 (or rank R) pod's trainer container log
    python k8s/render.py delete NAME [-n NS]           delete the PyTorchJob (its pods go with it); with
                                                       --api trainjob the TrainJob and its TrainingRuntime

The job kind: the spec key `api` for render/submit (`--spec api=KIND`), `--api KIND` for status/logs/delete
(make: API=KIND for all of them): pytorchjob (default), trainjob, or convert, the spec's dataset-conversion
batch/v1 Job: `submit JOB --spec api=convert` creates NAME-convert (with the spec's Kueue queue label), and
`status|logs|delete NAME --api convert` show its conditions, pods and exit status, print its pod's log and
delete it with its pods (NAME is still the job's name).

JOB is a spec name (k8s/jobs/JOB.yaml) or a path to a spec file; NAME is a submitted PyTorchJob's name (the
spec name unless `--name` chose another). Options of render/submit: `--set k=v` (trainer override, repeatable),
`--spec key=value` (job spec override, e.g. nodes=4), `--image` (else the spec's `image`, else $GNP_IMAGE;
one of them is required), `--namespace/-n`, `--name`, and for render `--part job|convert|monitoring|all`.

A job spec is small YAML (keys below) merged over k8s/jobs/_defaults.yaml. It renders to a `kubeflow.org/v1`
PyTorchJob for the training operator v1.9: Workers only, with an elasticPolicy (c10d rendezvous on
worker-0; min = max pods unless the spec is elastic) and `restartPolicy: ExitCode`, so the operator injects
no init container and every pod meets the `restricted` Pod Security Standard. The container runs the
image's entrypoint (docker/entrypoint.sh: torchrun reads the operator's PET_* variables; exit 2 = permanent
user error, >= 128 = retried).

What a lost pod does: losing any Worker but worker-0 leaves the other pods training (an elastic job goes on
with fewer pods, down to min_nodes; a fixed-size job waits for the recreated pod) and the lost pod rejoins;
every rank restarts from the last checkpoint. Losing worker-0, which hosts the c10d rendezvous, ends every
other agent (exit 200 or 201, both retried): the whole job restarts from its last checkpoint.

With a Kueue queue (spec key `queue`, or the namespace's only LocalQueue) submit creates the job suspended and
waits `--queue-wait` seconds (default 15) for the Workload Kueue makes for it.

User errors (unknown spec, bad spec value, no image, invalid name, no kubeconfig, unreachable cluster, CRD
missing, S3 Secret missing, job exists, forbidden, unknown or ambiguous LocalQueue, a queued job Kueue does not
manage) print one line `error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import cluster as kube
from . import kinds
from .errors import EXIT_USER, UserError
from .manifests import PARTS, render
from .spec import SPEC_DOC, check_name, list_jobs, load_job, load_spec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python k8s/render.py",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="job spec keys:\n" + SPEC_DOC,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("jobs", help="list the job specs")

    def job_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("job", metavar="JOB", help="spec name in k8s/jobs/ or path to a spec file")
        sp.add_argument(
            "--set",
            dest="sets",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="trainer override added to the pod's arguments (repeatable)",
        )
        sp.add_argument(
            "--spec",
            dest="spec",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="job spec override, e.g. nodes=4 or resources.memory=64Gi (repeatable)",
        )
        sp.add_argument("--image", help="container image (default: the spec's `image`, then $GNP_IMAGE)")
        sp.add_argument("--name", help="PyTorchJob name (default: the spec name)")
        sp.add_argument("-n", "--namespace", help="namespace (default: spec, then kubeconfig context, then default)")

    r = sub.add_parser("render", help="print the manifests (no cluster needed)")
    job_args(r)
    r.add_argument(
        "--part",
        choices=list(PARTS),
        default="job",
        help="job: the PyTorchJob (the TrainJob with --spec api=trainjob); runtime: the TrainJob's "
        "TrainingRuntime (namespaced); convert: the dataset-conversion Job; monitoring: PodMonitor + "
        "dashboard ConfigMap (rendered from k8s/monitoring/dashboard.json); all: every one of them",
    )
    s = sub.add_parser("submit", help="render and create the job (the spec's api: PyTorchJob, TrainJob, convert Job)")
    job_args(s)
    s.add_argument("--context", help="kubeconfig context")
    s.add_argument(
        "--queue-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with a Kueue queue: how long to wait for Kueue's Workload before stopping with the fix (default 15)",
    )
    for cmd, text in (
        ("status", "state, Kueue, waiting pods, progress, restarts, last failure, pods"),
        ("logs", "the rank-0 (--rank) log, --follow to stream it"),
        ("delete", "delete the job (and its pods)"),
    ):
        c = sub.add_parser(cmd, help=text)
        c.add_argument("name", metavar="NAME", help="job name (the spec name); --api convert: its NAME-convert Job")
        c.add_argument("-n", "--namespace")
        c.add_argument("--context", help="kubeconfig context")
        c.add_argument(
            "--api",
            choices=list(kinds.KINDS),
            default="pytorchjob",
            help="the job's kind (convert: the dataset-conversion Job)",
        )
        if cmd == "logs":
            c.add_argument("--no-follow", action="store_true", help="print the log so far and exit (the default)")
            c.add_argument("--follow", "-f", action="store_true", help="stream the log (make logs FOLLOW=1)")
            c.add_argument(
                "--wait", type=float, default=kube.LOG_WAIT_S, help="seconds to wait for the pod (default 120)"
            )
            c.add_argument("--rank", type=int, default=None, help="worker / node rank whose pod to read (default 0)")
            c.add_argument("--previous", action="store_true", help="the previous container's log (make PREVIOUS=1)")
        if cmd == "status":
            c.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="refresh every SECONDS")
            c.add_argument("--watch-count", type=int, default=None, metavar="N", help="stop after N reports")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "jobs":
        for name in list_jobs():
            _, data = load_spec(name)
            print(f"{name:28s} {data.get('description', '')}")
        return 0
    if args.command in ("render", "submit"):
        job = load_job(
            args.job,
            sets=args.sets,
            spec_overrides=args.spec,
            image=args.image,
            namespace=args.namespace,
            name=args.name,
        )
        kind = kinds.get(job.api, job.where)  # an unknown `api` stops here, before any cluster call
        if args.command == "render":
            sys.stdout.write(render(job, args.part))
            return 0
        cluster = kube.connect(job.namespace, args.context)
        if args.queue_wait is not None and args.queue_wait < 0:
            raise UserError(f"--queue-wait {args.queue_wait:g}: expected seconds >= 0")
        created = kinds.submit(job, cluster, wait_s=args.queue_wait)
        md = created.get("metadata", {})
        shape = (
            f"{job.nodes} pod(s), elastic {job.elastic[0]}-{job.elastic[1]}" if job.elastic else f"{job.nodes} pod(s)"
        )
        if md.get("labels", {}).get("app.kubernetes.io/component", "training") != "training":
            shape = md["labels"]["app.kubernetes.io/component"]  # e.g. the dataset-conversion Job: no GPU shape
        else:
            shape = f"{shape} x {job.nproc} process(es)"
        print(
            f"submitted {job.api} {job.namespace}/{md.get('name', job.name)}: recipe {job.recipe}, {shape}, "
            f"image {job.image}"
        )
        print("follow it with:\n" + kind.follow_up(job.name, job.namespace))
        return 0
    check_name(args.name)
    cluster = kube.connect(args.namespace, args.context)
    kind = kinds.get(args.api)
    if args.command == "status":
        if args.watch is None:
            print(kind.status(cluster, args.name))
            return 0
        if args.watch <= 0:
            raise UserError(f"--watch {args.watch:g}: expected seconds > 0")
        n = 0
        while True:  # Ctrl-C ends it (main: status 130)
            report = kind.status(cluster, args.name)
            if sys.stdout.isatty():
                sys.stdout.write("\033[H\033[2J")
            print(f"{report}\n(every {args.watch:g} s; Ctrl-C stops)", flush=True)
            n += 1
            if args.watch_count is not None and n >= args.watch_count:
                return 0
            time.sleep(args.watch)
    elif args.command == "logs":
        if args.wait < 0:
            raise UserError(f"--wait {args.wait:g}: expected seconds >= 0")
        kind.logs(
            cluster,
            args.name,
            follow=args.follow and not args.no_follow,
            wait_s=args.wait,
            rank=args.rank,
            previous=args.previous,
        )
    elif args.command == "delete":
        kind.delete(cluster, args.name)
        print(f"deleted {args.api} {cluster.namespace}/{args.name} (its pods and services are garbage-collected)")
    return 0
