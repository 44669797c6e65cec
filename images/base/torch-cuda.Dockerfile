# Local stand-in for the official pytorch/pytorch:<torch>-cuda...-runtime base of images/server/Dockerfile,
# for machines that reach PyPI but no container registry (images/build.sh builds it only there):
# a Debian Python base (images/base/debian.sh python) plus PyPI's torch for Linux, which is the CUDA
# build and brings the CUDA runtime, cuDNN, cuBLAS and NCCL as nvidia-* wheels.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG TORCH_VERSION
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" && python -c "import torch; print(torch.__version__, torch.version.cuda)"
