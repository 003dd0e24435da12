#!/usr/bin/env bash
# Container entrypoint of the GNP trainer image.
#
#   [train] --recipe NAME [--set k=v ...]   torchrun -m trainer train ... (the default mode)
#   convert --dataset D --out DIR [...]      python -m trainer convert ...; then upload DIR to $GNP_DATA_S3 if set
#   help                                     this text
#   anything else                            exec'd as a command (e.g. `bash`, `python -m trainer recipes`)
#
# torchrun gets no --nnodes/--node_rank/--master_*/--rdzv_* flags: it reads them from the PET_* variables
# that the Kubeflow training operator injects (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT,
# PET_NPROC_PER_NODE, PET_RDZV_*, PET_MAX_RESTARTS). Outside Kubernetes, set PET_NPROC_PER_NODE yourself.
#
# Exit status (what Kubeflow's `restartPolicy: ExitCode` sees: 1-127 permanent, 128-255 retried):
#   0        training finished
#   2        a rank exited 2: bad config, unknown recipe, bad or missing dataset -> permanent, never retried
#   128+N    this container got signal N (143: SIGTERM from a pod deletion, eviction or preemption)
#   1        a rank crashed (uncaught exception) and GNP_RETRY_CRASHES is not 1 -> permanent
#   201      a rank crashed and GNP_RETRY_CRASHES=1 (NCCL timeout, lost peer, CUDA error, or a bug) -> retried
#   200      torchrun failed and no rank recorded a status: a rank was killed by a signal (OOM killer),
#            or the rendezvous/agent failed -> retried
# Why not torchrun's own status: on any rank failure torchrun raises ChildFailedError and exits 1, which
# would make a preemption of a peer permanent and hide the trainer's 2. So each rank runs through a small
# Python shim that records its exit status in $GNP_STATUS_DIR/exit.<restart>.<local_rank>, and this script
# maps the statuses of torchrun's last restart attempt as above.
#
# Environment: GNP_PYTHON (python to use, default `python`), GNP_MODULE (module the ranks run, default
# `trainer`), GNP_RETRY_CRASHES (0|1, default 0), GNP_DATA_S3 + GNP_DATA_DIR (train: download the FFCV
# dataset under that s3:// prefix into GNP_DATA_DIR first; convert: upload the output there afterwards),
# GNP_CONVERT_SOURCE_S3 (convert: download this s3:// object or prefix and pass it as --source),
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL_S3 (S3 access).
set -uo pipefail

PY=${GNP_PYTHON:-python}
EXIT_USER=2
EXIT_RETRY_UNKNOWN=200
EXIT_RETRY_CRASH=201

log() { echo "entrypoint: $*" >&2; }

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

# Runs in every rank instead of `python -m trainer`: identical semantics (runpy, run_name __main__),
# plus a record of the exit status that torchrun's own exit status loses.
# shellcheck disable=SC2016
RANK_SHIM='
import os, runpy, sys
module, code = sys.argv.pop(1), 1
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    raise
finally:
    if code:
        name = "exit.%s.%s" % (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), os.environ.get("LOCAL_RANK", "0"))
        with open(os.path.join(os.environ["GNP_STATUS_DIR"], name), "w") as f:
            f.write("%d\n" % code)
'

# S3 transfers for datasets (boto3 is a dependency of the project). Exit 2 for permanent problems
# (no credentials, access denied, no such bucket, nothing under the prefix), 200 for the rest.
# shellcheck disable=SC2016
S3_TOOL='
import os, sys
import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

op, src, dst = sys.argv[1:4]

def split(uri):
    if not uri.startswith("s3://") or len(uri) <= 5:
        sys.exit(print(f"s3: {uri!r} is not an s3://bucket/prefix URI", file=sys.stderr) or 2)
    bucket, _, key = uri[5:].partition("/")
    return bucket, key.strip("/")

endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or None
s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(
    retries={"mode": "standard", "max_attempts": 8},
    request_checksum_calculation="when_required", response_checksum_validation="when_required",
    s3={"addressing_style": "path"} if endpoint else None))
try:
    if op == "get":
        bucket, prefix = split(src)
        keys = [(o["Key"], o["Size"]) for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix + "/" if prefix else "") for o in page.get("Contents", [])]
        if not keys:  # a single object rather than a prefix
            head = s3.head_object(Bucket=bucket, Key=prefix)
            keys, prefix = [(prefix, head["ContentLength"])], os.path.dirname(prefix)
        # meta.json marks a complete FFCV dataset, so it is written last
        keys.sort(key=lambda k: k[0].endswith("/meta.json"))
        for key, size in keys:
            path = os.path.join(dst, os.path.relpath(key, prefix) if prefix else key)
            if os.path.isfile(path) and os.path.getsize(path) == size:
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            s3.download_file(bucket, key, path + ".part")
            os.replace(path + ".part", path)
        print(f"s3: {len(keys)} objects from {src} in {dst}", file=sys.stderr)
    elif op == "put":
        bucket, prefix = split(dst)
        files = sorted((os.path.join(r, n) for r, _, ns in os.walk(src) for n in ns),
                       key=lambda p: os.path.basename(p) == "meta.json")
        for path in files:
            s3.upload_file(path, bucket, "/".join(filter(None, [prefix, os.path.relpath(path, src)])))
        print(f"s3: {len(files)} files from {src} to {dst}", file=sys.stderr)
except NoCredentialsError:
    sys.exit(print("s3: no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (from the S3 Secret)",
                   file=sys.stderr) or 2)
except ClientError as e:
    code = e.response.get("Error", {}).get("Code", "")
    print(f"s3: {op} {src} -> {dst}: {code}: {e}", file=sys.stderr)
    sys.exit(2 if code in {"403", "404", "AccessDenied", "NoSuchBucket", "NoSuchKey", "InvalidAccessKeyId",
                           "SignatureDoesNotMatch", "InvalidBucketName"} else 200)
except BotoCoreError as e:
    sys.exit(print(f"s3: {op} {src} -> {dst}: {e}", file=sys.stderr) or 200)
'

s3() { "$PY" -c "$S3_TOOL" "$@"; }

# Bash as PID 1 ignores SIGTERM unless trapped: remember the signal and pass SIGTERM on to the child
# (always TERM: a background job of a non-interactive shell ignores SIGINT).
child=0
got_signal=0
on_signal() {
    got_signal=$((128 + $1))
    [ "$child" -ne 0 ] && kill -TERM "$child" 2>/dev/null
}
trap 'on_signal 15' TERM
trap 'on_signal 2' INT

# Wait for the background child; `wait` returns early when a trapped signal arrives, so loop until it is gone.
wait_child() {
    local rc
    while :; do
        wait "$child"
        rc=$?
        kill -0 "$child" 2>/dev/null || return "$rc"
    done
}

train() {
    if [ -n "${GNP_DATA_S3:-}" ]; then
        s3 get "$GNP_DATA_S3" "${GNP_DATA_DIR:?GNP_DATA_DIR must be set with GNP_DATA_S3}" || exit $?
    fi
    GNP_STATUS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gnp-status.XXXXXX") || exit "$EXIT_RETRY_UNKNOWN"
    export GNP_STATUS_DIR
    "$PY" -m torch.distributed.run --no-python "$PY" -c "$RANK_SHIM" "${GNP_MODULE:-trainer}" train "$@" &
    child=$!
    wait_child
    local rc=$?
    [ "$got_signal" -ne 0 ] && exit "$got_signal"
    [ "$rc" -eq 0 ] && exit 0

    # Statuses of torchrun's last attempt (an elastic restart starts a new attempt number).
    local last codes=()
    last=$(find "$GNP_STATUS_DIR" -name 'exit.*' -printf '%f\n' | cut -d. -f2 | sort -n | tail -1)
    [ -n "$last" ] && mapfile -t codes < <(cat "$GNP_STATUS_DIR"/exit."$last".*)
    local code crash=0
    for code in "${codes[@]}"; do
        [ "$code" -eq "$EXIT_USER" ] && { log "a rank reported a user error (exit 2): not retryable"; exit "$EXIT_USER"; }
        [ "$code" -ge 1 ] && [ "$code" -le 127 ] && crash=1
    done
    if [ "$crash" -eq 1 ]; then
        if [ "${GNP_RETRY_CRASHES:-0}" = 1 ]; then
            log "a rank crashed; exit $EXIT_RETRY_CRASH so that the operator retries (GNP_RETRY_CRASHES=1)"
            exit "$EXIT_RETRY_CRASH"
        fi
        log "a rank crashed; exit 1 (permanent; GNP_RETRY_CRASHES=1 makes crashes retryable)"
        exit 1
    fi
    log "torchrun exited $rc without a rank status (signal-killed rank or rendezvous failure): exit $EXIT_RETRY_UNKNOWN (retryable)"
    exit "$EXIT_RETRY_UNKNOWN"
}

convert() {
    local args=("$@")
    if [ -n "${GNP_CONVERT_SOURCE_S3:-}" ]; then
        local src="${TMPDIR:-/tmp}/gnp-convert-source"
        s3 get "$GNP_CONVERT_SOURCE_S3" "$src" || exit $?
        # a single object (e.g. cifar-10-python.tar.gz) is passed as the file itself
        [ "$(find "$src" -type f | wc -l)" -eq 1 ] && src=$(find "$src" -type f)
        args+=(--source "$src")
    fi
    "$PY" -m trainer convert "${args[@]}" &
    child=$!
    wait_child
    local rc=$?
    [ "$got_signal" -ne 0 ] && exit "$got_signal"
    [ "$rc" -ne 0 ] && exit "$rc"
    if [ -n "${GNP_DATA_S3:-}" ]; then
        local out="" prev=""
        for a in "${args[@]}"; do
            [ "$prev" = "--out" ] && out=$a
            [ "${a#--out=}" != "$a" ] && out=${a#--out=}
            prev=$a
        done
        s3 put "${out:?convert needs --out}" "$GNP_DATA_S3" || exit $?
    fi
    exit 0
}

case "${1:-help}" in
    help|-h|--help) usage ;;
    train) shift; train "$@" ;;
    convert) shift; convert "$@" ;;
    -*) train "$@" ;;
    *) exec "$@" ;;
esac
