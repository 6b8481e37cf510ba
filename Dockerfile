# launcher on a CUDA PyTorch image. The devel variant ships nvcc, which DeepSpeed needs to
# JIT-compile its fused ops (FusedAdam, CPU Adam for offload) on first use.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/launcher
# Dependencies first so that code changes do not reinstall them. torch comes from the base image;
# pip keeps it because the project's torch requirement (>=2.4) is already satisfied.
COPY pyproject.toml README.md ./
COPY launcher ./launcher
RUN pip install -e '.[wandb]'
COPY recipes ./recipes
COPY docs ./docs

ENTRYPOINT ["launcher"]
CMD ["--help"]
