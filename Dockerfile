# sharded-optim on CUDA: the official PyTorch runtime image plus the package with its DeepSpeed and MPI extras.
#
#   docker build -t sharded-optim .                       (or: make docker)
#   docker run --gpus all --rm -p 9400-9407:9400-9407 sharded-optim           # quickstart on every visible GPU
#   docker run --gpus all --rm sharded-optim bash launch/torchrun.sh --config configs/gpu-scale.yaml
# Multi-node: run the image on each node with --network host and use launch/slurm.sbatch (torchrun c10d
# rendezvous) or launch/mpirun.sh with a hostfile; NCCL picks the interfaces (set NCCL_SOCKET_IFNAME if needed).
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

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
CMD ["bash", "launch/torchrun.sh", "--config", "configs/quickstart.yaml"]
