# ugi-bids: the BIDS-App image, CPU (default) or CUDA, from one file. See README, "Containers".
#
#   docker build -t ugi-bids:cpu .
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t ugi-bids:cuda .
#
# The weights and the TemplateFlow files of the default output space are baked in at build time,
# with their SHA-256 recorded in /opt/ugi-bids-home/image-contents.json and SHA256SUMS. Where the
# build cannot download: --build-arg WEIGHTS=<file in the build context> (or WEIGHTS=none: the
# image then answers every run with one line and exit 66) and --build-arg TEMPLATEFLOW=<a
# TemplateFlow-shaped folder in the build context>; BASE_IMAGE=<a local image> where no registry
# is reachable (any Debian-like image with python3 >= 3.10, its venv module and bash).

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------ builder: venv and resources
FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The torch build: CPU by default; a CUDA index (e.g. .../whl/cu128) gives the CUDA image. Empty:
# torch comes from PyPI or from wheels put in docker/wheels/.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# PIP_NO_INDEX=1: an offline build from the wheels in docker/wheels/ only (see its README).
ARG PIP_NO_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python3 -m venv /opt/ugi-bids
COPY docker/wheels/ /tmp/wheels/
RUN /opt/ugi-bids/bin/pip install --no-cache-dir --find-links /tmp/wheels \
        ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple} \
        "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md /src/
COPY ugi_bids/ /src/ugi_bids/
RUN /opt/ugi-bids/bin/pip install --no-cache-dir --find-links /tmp/wheels /src \
    && rm -rf /src/build

# Resources, resolved by the same code as at run time (docker/bake_image.py).
ARG WEIGHTS=fetch
ARG TEMPLATEFLOW=fetch
ARG SPACES=MNI152NLin2009cAsym
ARG ATLASES=
ENV TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    UGI_BIDS_HOME=/opt/ugi-bids-home
COPY docker/bake_image.py /opt/ugi-bids/share/bake_image.py
WORKDIR /context
RUN --mount=type=bind,source=.,target=/context \
    /opt/ugi-bids/bin/python /opt/ugi-bids/share/bake_image.py \
        --weights "${WEIGHTS}" --templateflow "${TEMPLATEFLOW}" \
        --spaces "${SPACES}" --atlases "${ATLASES}"

# ------------------------------------------------------------------ runtime
FROM ${BASE_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="ugi-bids" \
      org.opencontainers.image.description="uniGradICON registration for BIDS datasets (BIDS-App)" \
      org.opencontainers.image.licenses="Apache-2.0"

# A non-root user whose home any UID can write (Apptainer runs as the calling user).
RUN useradd --create-home --home-dir /home/ugi --uid 1000 --user-group --shell /bin/bash ugi \
    && chmod -R go=u /home/ugi

COPY --from=builder /opt/ugi-bids /opt/ugi-bids
# Read-only for the runtime user (root-owned, 0644): the baked resources cannot be altered.
COPY --from=builder /opt/templateflow /opt/templateflow
COPY --from=builder /opt/ugi-bids-home /opt/ugi-bids-home

# OMP_NUM_THREADS=1: nipype owns the parallelism (--nprocs, --omp-nthreads). Numba's and
# matplotlib's caches go to /tmp, which every runtime (Docker, Apptainer --containall, ch-run)
# gives writable, since the image and a cluster's home may be read-only.
ENV PATH=/opt/ugi-bids/bin:${PATH} \
    HOME=/home/ugi \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    UGI_BIDS_HOME=/opt/ugi-bids-home \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["ugi-bids"]
