# sharded-optim on CUDA: the official PyTorch runtime image plus the package with its DeepSpeed and MPI extras.
#
#   docker build -t sharded-optim .                       (or: make docker)
#   docker run --gpus all --rm -p 9400-9407:9400-9407 sharded-optim           # quickstart on every visible GPU
#   docker run --gpus all --rm sharded-optim bash launch/torchrun.sh --config configs/gpu-scale.yaml
# The default command trains configs/quickstart-gpu.yaml (device cuda, NCCL, one rank per GPU) with its metrics on
# 0.0.0.0:9400 + local rank, so the published ports 9400-9407 reach up to 8 ranks.  Runs are written to
# /opt/sharded-optim/runs inside the container: mount a volume there to keep them (a second run in the same
# run directory is refused; add --resume or --overwrite to the command).
# Multi-node: run the image on each node with --network host and use launch/slurm.sbatch (torchrun c10d
# rendezvous) or launch/mpirun.sh with a hostfile; NCCL picks the interfaces (set NCCL_SOCKET_IFNAME if needed).
# torch 2.13.0, the version constraints.txt pins and the test suite runs on (CUDA 12.6 build: H100/H200, A100, L4 ...).
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/sharded-optim
# Build tools for DeepSpeed's JIT C++ ops; procps for launcher process handling
RUN apt-get update && apt-get install -y --no-install-recommends build-essential procps \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY sharded_optim ./sharded_optim
COPY configs ./configs
COPY launch ./launch
COPY bench ./bench
# Keep the image's CUDA torch: constrain torch to the version already installed
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt -e ".[deepspeed,mpi]"
EXPOSE 9400-9407
CMD ["bash", "launch/torchrun.sh", "--config", "configs/quickstart-gpu.yaml"]
