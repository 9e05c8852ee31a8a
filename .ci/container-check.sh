#!/usr/bin/env bash
# Proof that the container image works, as a cluster user runs it. Run by .ci/run after the
# tests; needs root (podman, buildah, mmdebstrap and charliecloud from Debian are installed if
# missing) and the project's venv (PYTHON, default .venv/bin/python).
#
#  1. lint the Dockerfile (hadolint) and compare singularity.def with it (spython)
#  2. build the image from the Dockerfile with podman, offline (--network none: this machine's
#     builds reach no registry, so the base is made with mmdebstrap and the wheels with pip
#     wheel), once without weights and once with a test checkpoint (WEIGHTS=<file in context>)
#  3. the image without weights: one line and exit 66, nothing written
#  4. the BIDS-App in the image: an arbitrary non-root UID, --network none, a read-only image
#     and home, the dataset read-only, output and work bound from the host; the outputs checked
#     as the app tests check them (names, sidecars, ANTs reading every transform)
#  5. the same under Charliecloud's ch-run (unprivileged, read-only image, the host user, a
#     clean environment), the nearest stand-in for Apptainer that installs here
#  6. the image size, and what dominates it
#
# Apptainer itself does not install here: its build and --nv runs are not exercised.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
case $PYTHON in /*) ;; *) PYTHON="$PWD/$PYTHON" ;; esac
TAG=localhost/ugi-bids
started=$(date +%s)
step() { printf '\n== [%4ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }

step "tools"
if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v ch-run >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah mmdebstrap charliecloud runc uidmap >/dev/null
fi
podman --version; echo "charliecloud $(USER=root ch-run --version 2>&1)"
work=$(mktemp -d /tmp/ugi-container.XXXXXX)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT

# This machine's kernel lets no process raise a resource limit (no CAP_SYS_RESOURCE), and its
# cgroups are in hybrid mode, which crun refuses: use runc, with limits below the current ones.
nofile=$(( $(ulimit -Hn) < 8192 ? $(ulimit -Hn) : 8192 ))
nproc=$(( $(ulimit -Hu) < 8192 ? $(ulimit -Hu) : 8192 ))
cat > "$work/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$work/containers.conf"

step "1. Dockerfile lint (hadolint) and singularity.def against the Dockerfile (spython)"
"$(dirname "$PYTHON")/hadolint" Dockerfile && echo "  ok: hadolint: no findings"
"$PYTHON" -m tests.container_check definitions 2>/dev/null

step "2. build the image (podman, offline)"
base=${BASE_IMAGE:-}
if [ -z "$base" ]; then
    base=localhost/ugi-base:bookworm
    if ! podman image exists "$base"; then
        mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$work/base.tar" http://deb.debian.org/debian
        podman import --quiet "$work/base.tar" "$base" >/dev/null
        rm -f "$work/base.tar"
    fi
fi
echo "  base image: $base"
torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)")
"$PYTHON" -m pip wheel -q --wheel-dir docker/wheels . "torch==${torch_version}" "setuptools>=64" \
    > "$work/wheels.log" 2>&1 || { cat "$work/wheels.log"; exit 1; }
echo "  wheels for the offline build: $(ls docker/wheels/*.whl | wc -l) in docker/wheels/"
rm -f docker/wheels/ugi_bids-*.whl
"$PYTHON" -m tests.container_check prepare "$work"
build() {  # build TAG WEIGHTS
    local began=$(date +%s)
    podman build --quiet --network none --format docker -f Dockerfile -t "$1" \
        --build-arg BASE_IMAGE="$base" --build-arg PIP_NO_INDEX=1 --build-arg TORCH_INDEX= \
        --build-arg TORCH_VERSION="$torch_version" --build-arg WEIGHTS="$2" \
        --build-arg TEMPLATEFLOW=.container-inputs/templateflow . >/dev/null
    echo "  built $1 (WEIGHTS=$2) in $(( $(date +%s) - began )) s"
}
build "$TAG:ci-noweights" none
build "$TAG:ci" .container-inputs/weights/Step_2_final.trch

bids="$work/bids"
chmod -R a+rX "$bids"
uid=54321  # any UID, as Apptainer gives the caller's: not the image's user (1000)
run_app() {  # run_app IMAGE DERIVATIVES WORK [ugi-bids arguments...]: DERIVATIVES/ugi-bids
    local image=$1 derivatives=$2 wd=$3; shift 3
    mkdir -p "$derivatives" "$wd"; chown "$uid:$uid" "$derivatives" "$wd"
    podman run --rm --network none --user "$uid:$uid" --read-only \
        -v "$bids:/data:ro" -v "$derivatives:/out" -v "$wd:/work" "$image" \
        /data /out/ugi-bids participant -w /work "$@"
}

step "3. the image without weights"
set +e
run_app "$TAG:ci-noweights" "$work/none" "$work/work-none" --sloppy 2> "$work/none.err" >/dev/null
code=$?
set -e
grep "error" "$work/none.err"
[ "$code" -eq 66 ] || { echo "FAIL: exit $code, not 66"; cat "$work/none.err"; exit 1; }
[ "$(grep -c "error" "$work/none.err")" -eq 1 ] && ! grep -q Traceback "$work/none.err" \
    || { echo "FAIL: not one error line"; cat "$work/none.err"; exit 1; }
grep -q "built without the uniGradICON weights" "$work/none.err"
[ -z "$(ls -A "$work/none")" ] || { echo "FAIL: output written:"; ls -A "$work/none"; exit 1; }
echo "  ok: exit 66, one error line, no traceback, nothing written"

step "4. the BIDS-App in the image (uid $uid, --network none, --read-only, input read-only)"
out="$work/podman/ugi-bids"
began=$(date +%s)
run_app "$TAG:ci" "$work/podman" "$work/work-podman" --sloppy --io-iterations 0 --nprocs 2 --omp-nthreads 1 2>&1 | tail -3
echo "  ugi-bids ran in $(( $(date +%s) - began )) s"
[ "$(stat -c %u "$out/dataset_description.json")" -eq "$uid" ]
echo "  ok: outputs owned by the calling uid $uid"
"$PYTHON" -m tests.container_check outputs "$out" "$bids" .container-inputs/templateflow \
    --container podman

step "5. the same under Charliecloud (ch-run: unprivileged, read-only image, host user)"
id ugi-ch >/dev/null 2>&1 || useradd --create-home ugi-ch
image_dir="$work/image"
mkdir -p "$image_dir"
podman export "$(podman create "$TAG:ci")" | tar -x -C "$image_dir" --exclude='dev/*'
mkdir -p "$image_dir/data" "$image_dir/out" "$image_dir/work"
podman image inspect "$TAG:ci" --format '{{range .Config.Env}}{{println .}}{{end}}' \
    | grep . > "$work/image.env"
ch_out="$work/ch/ugi-bids"
mkdir -p "$work/ch" "$work/ch-work"; chown -R ugi-ch "$work/ch" "$work/ch-work"
began=$(date +%s)
runuser -u ugi-ch -- env -i USER=ugi-ch PATH=/usr/bin:/bin \
    ch-run --unset-env='*' --set-env="$work/image.env" \
    -b "$bids:/data" -b "$work/ch:/out" -b "$work/ch-work:/work" "$image_dir" -- \
    ugi-bids /data /out/ugi-bids participant -w /work --sloppy --io-iterations 0 --nprocs 2 --omp-nthreads 1 2>&1 | tail -3
echo "  ugi-bids ran in $(( $(date +%s) - began )) s under ch-run as $(id -u ugi-ch) (ugi-ch)"
[ "$(stat -c %U "$ch_out/dataset_description.json")" = ugi-ch ]
"$PYTHON" -m tests.container_check outputs "$ch_out" "$bids" .container-inputs/templateflow \
    --container charliecloud

step "6. image size"
for image in "$TAG:ci-noweights" "$TAG:ci"; do
    size=$(podman image inspect "$image" --format '{{.Size}}')
    awk -v image="$image" -v size="$size" 'BEGIN {printf "  %-32s %6.2f GB\n", image, size / 1e9}'
done
limit=2500000000
[ "$(podman image inspect "$TAG:ci-noweights" --format '{{.Size}}')" -le "$limit" ] \
    || { echo "FAIL: the CPU image without weights is over 2.5 GB"; exit 1; }
echo "  largest parts (CPU image, no weights):"
podman run --rm --network none --entrypoint /bin/bash "$TAG:ci-noweights" -c \
    'du -s /usr /opt/templateflow /opt/ugi-bids-home /opt/ugi-bids/lib/python3*/site-packages/* 2>/dev/null | sort -rn | head -8' \
    | awk '{printf "    %7.0f MB  %s\n", $1/1024, $2}'
step "container check passed"
