#!/usr/bin/env bash
# Smoke test of a built trainer image; `make image` runs it right after the build.
#   docker/smoke.sh IMAGE
# Everything runs as uid 1000 on a read-only root with a tmpfs /tmp (what the pod's securityContext and
# emptyDir give), through the image's entrypoint, without network access to anything but loopback:
#   1. uid 1000, read-only root, writable /tmp
#   2. imports torch, torchvision, ffcv (with its compiled extension), cv2, the trainer; prints versions
#   3. the CLI: `python -m trainer --help` and the entrypoint's `help`
#   4. a few CPU training steps: recipe debug-cpu, data.loader=memory, 2 ranks under torchrun (gloo),
#      on the image's Fashion-MNIST (Debian's dataset-fashion-mnist) or, in a base without it, synthetic data
#   5. FFCV end to end: convert 512 Fashion-MNIST images to .beton and train 4 steps on them (skipped without it)
# ENGINE=docker|podman (default: docker if a daemon answers, else podman) runs each check with
#   ENGINE run --rm --read-only --user 1000:1000 --tmpfs /tmp --network none IMAGE ...
# SMOKE_MODE=run|chroot|auto (default auto). Where `podman run` cannot start a container at all (no cgroups, no
# setrlimit in a nested sandbox), auto falls back to chroot (root only): the image is mounted with
# `podman image mount` and every check runs there by `chroot --userspec=1000:1000` with the image's environment,
# on a read-only overlay of the image (lower layers only) with a fresh tmpfs on /tmp, /proc and /dev, and the
# /etc/hosts a container runtime would add. The output says which mode ran.
set -euo pipefail

image=${1:?usage: docker/smoke.sh IMAGE}
engine=${ENGINE:-}
if [ -z "$engine" ]; then
    if docker info >/dev/null 2>&1; then engine=docker; else engine=podman; fi
fi
mode=${SMOKE_MODE:-auto}
FMNIST=/usr/share/datasets/fashion-mnist

# ---------------------------------------------------------------------------------------------------
# Running one command in the image (through its entrypoint), as uid 1000 on a read-only root.

run_container() {
    "$engine" run --rm --read-only --user 1000:1000 --tmpfs /tmp --network none "$image" "$@"
}

chroot_setup() {
    [ "$engine" = podman ] || { echo "smoke: SMOKE_MODE=chroot needs podman (image mount)" >&2; exit 2; }
    [ "$(id -u)" -eq 0 ] || { echo "smoke: SMOKE_MODE=chroot needs root" >&2; exit 2; }
    work=$(mktemp -d)
    trap chroot_cleanup EXIT
    image_dir=$(podman image mount "$image")
    # What a container runtime adds to the root: an /etc/hosts that names the container's own hostname
    # (torchrun's rendezvous resolves it: without it the agent retries for ever).
    mkdir -p "$work/extra/etc"
    printf '127.0.0.1\tlocalhost gnp-smoke\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$work/extra/etc/hosts"
    echo gnp-smoke >"$work/extra/etc/hostname"
    podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$image" | sed '/^$/d' >"$work/env"
    podman image inspect --format '{{range .Config.Entrypoint}}{{println .}}{{end}}' "$image" | sed '/^$/d' \
        >"$work/entrypoint"
    # Runs in private mount and UTS namespaces (unshare), so every mount vanishes with it. An overlay made of lower
    # layers only is read-only: the image itself cannot be changed, and /tmp is a fresh tmpfs per check.
    cat >"$work/ns.sh" <<'EOF'
set -euo pipefail
image_dir=$1 work=$2
shift 2
mapfile -t image_env <"$work/env"
mapfile -t entrypoint <"$work/entrypoint"
hostname gnp-smoke  # a UTS namespace of its own (unshare --uts), like a container
root=$(mktemp -d "$work/root.XXXXXX")  # the mounts below exist only in this namespace
mount -t overlay overlay -o "lowerdir=$work/extra:$image_dir" "$root"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t tmpfs -o mode=755,nosuid tmpfs "$root/dev"
for d in null zero full random urandom tty; do touch "$root/dev/$d"; mount --bind "/dev/$d" "$root/dev/$d"; done
mkdir "$root/dev/shm" && mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
mount --rbind /sys "$root/sys"
chroot=$(command -v chroot)
exec env -i "${image_env[@]}" "$chroot" --userspec=1000:1000 "$root" \
    /bin/sh -c 'cd /tmp && exec "$@"' sh "${entrypoint[@]}" "$@"
EOF
}

chroot_cleanup() {
    podman image unmount "$image" >/dev/null || true
    rm -rf "$work"
}

run() {
    if [ "$mode" = chroot ]; then
        unshare --mount --uts --fork -- bash "$work/ns.sh" "$image_dir" "$work" "$@"
    else
        run_container "$@"
    fi
}

if [ "$mode" = auto ]; then
    if err=$(run_container true 2>&1); then
        mode=run
    elif [ "$engine" = podman ] && [ "$(id -u)" -eq 0 ]; then
        echo "smoke: \`podman run\` cannot start a container here: $(tail -n 1 <<<"$err")"
        mode=chroot
    else
        echo "smoke: \`$engine run\` failed: $err" >&2
        exit 1
    fi
fi
if [ "$mode" = chroot ]; then
    chroot_setup
    echo "smoke: $image: chroot into \`podman image mount\` as uid 1000, read-only overlay root, tmpfs /tmp"
else
    echo "smoke: $image: $engine run --read-only --user 1000:1000 --tmpfs /tmp --network none"
fi

# ---------------------------------------------------------------------------------------------------
# The checks.

step() { echo; echo "smoke: == $* =="; }

step "1. uid 1000, read-only root, writable /tmp"
run bash -c 'set -e; echo "uid $(id -u) gid $(id -g) HOME=$HOME cwd $PWD"
    opts=$(awk '\''$2 == "/" {o = $4} END {print o}'\'' /proc/mounts)
    case ",$opts," in *,ro,*) ;; *) echo "the root is mounted $opts, not read-only" >&2; exit 1 ;; esac
    touch /tmp/.w && echo "root mounted read-only, /tmp writable"'

step "2. imports"
run python -c '
import sys
from importlib.metadata import version
import cv2, ffcv, ffcv.libffcv, numba, torch, torchvision
import trainer
ffcv_version = version("ffcv")  # ffcv.__version__ says 0.0.3rc1 in the 1.0.2 release
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}), torchvision {torchvision.__version__}, ffcv {ffcv_version}, "
      f"opencv {cv2.__version__}, numba {numba.__version__}, gloo {torch.distributed.is_gloo_available()}")'

step "3. CLI"
run python -m trainer --help | sed -n 1,5p
run help | sed -n 1,3p

if run test -d "$FMNIST"; then data=fashion-mnist:$FMNIST; else data=synthetic:28x28:10:512; fi
step "4. CPU training, memory loader, 2 ranks (torchrun, gloo): $data"
run env PET_NPROC_PER_NODE=2 OMP_NUM_THREADS=1 /opt/gnp/docker/entrypoint.sh train --recipe debug-cpu \
    --set data.loader=memory --set "data.path=$data" --set data.limit=512 --set loop.epochs=1 \
    --set loop.max_steps=8 --set loop.log_every=4 --set run.dir=/tmp/run --set run.fresh=true

if [ "${data%%:*}" = fashion-mnist ]; then
    step "5. FFCV: convert 512 images, train 4 steps on the .beton (1 rank)"
    run bash -c "set -e
        python -m trainer convert --dataset fashion-mnist --source $FMNIST --out /tmp/fm --limit 512
        PET_NPROC_PER_NODE=1 OMP_NUM_THREADS=1 /opt/gnp/docker/entrypoint.sh train --recipe debug-cpu \
            --set data.path=/tmp/fm --set loop.epochs=1 --set loop.max_steps=4 --set loop.log_every=2 \
            --set run.dir=/tmp/run --set run.fresh=true"
else
    step "5. FFCV end to end: skipped (no Fashion-MNIST in this image)"
fi

echo
echo "smoke: $image: all checks passed ($mode mode)"
