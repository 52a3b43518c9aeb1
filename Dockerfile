# compress in a container.
#
# CPU image (the CI use: `compress run`, `compress gate`):
#   docker build -t compress:cpu .
#   docker run --rm -v "$PWD:/work" compress:cpu run recipes/ci-2to4.yaml --out runs/ci-2to4
#   docker run --rm -v "$PWD:/work" compress:cpu gate runs/ci-2to4/report.json --baseline recipes/baselines/ci-2to4.json
#
# GPU image on NVIDIA's TensorRT container (x86_64 with a discrete GPU; TensorRT comes with the base):
#   docker build --build-arg BASE=nvcr.io/nvidia/tensorrt:25.01-py3 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t compress:trt .
# Jetson (aarch64, JetPack 6): BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0 and a TORCH_INDEX serving Jetson
# wheels; engines must be built on the device that runs them (they are not portable across GPUs).
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLBACKEND=Agg \
    COMPRESS_RECIPES=/opt/compress/recipes \
    COMPRESS_CACHE_DIR=/work/.cache/compress

WORKDIR /opt/compress
# torch first, from the index that matches the base (CPU wheels are a tenth of the CUDA ones)
# pinned through TORCH_SPEC, which hadolint cannot read
# hadolint ignore=DL3013
RUN python3 -m pip install --index-url "${TORCH_INDEX}" ${TORCH_SPEC}
COPY pyproject.toml README.md ./
COPY compress ./compress
COPY export ./export
COPY recipes ./recipes
# the project itself is what is being installed; its dependencies are ranged in pyproject.toml
# hadolint ignore=DL3013
RUN python3 -m pip install ".[vision,demo]" && useradd --create-home --uid 10001 compress
USER 10001
WORKDIR /work
ENTRYPOINT ["compress"]
CMD ["--help"]
