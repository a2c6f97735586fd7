#!/bin/bash
# Train RawNet2 on N nodes x 8 GPUs under Slurm: one srun task per node starts torchrun, which
# starts one rank per GPU; the nodes meet through torchrun's c10d rendezvous on the job's first
# node. Submit from the repository root (extra arguments go to rawnet_lib.train, later flags win):
#   sbatch scripts/slurm_train.sh --data_path /data/DB
#   sbatch --nodes=4 scripts/slurm_train.sh --data_path /data/DB --name paper_4n --epochs 20
# The global batch splits over the ranks: 96, the multiple of 8, 16 and 32 nearest the paper's 100.
# The run folder is outputs/train/train_<nodes*8>P/DNNS/<name>/ on the file system the nodes share;
# global rank 0 writes it and its log goes to rawnet2-<jobid>.out.
#SBATCH --job-name=rawnet2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#
# Ascend NPUs (910) instead of GPUs: Slurm usually knows them as a generic resource, so replace
# --gpus-per-node=8 above by
#   #SBATCH --gres=npu:8
# run with DEVICE=npu (sbatch --export=ALL,DEVICE=npu ...), and load CANN on every node first:
#   source /usr/local/Ascend/ascend-toolkit/set_env.sh
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
PYTHON=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}                  # npu on Ascend (HCCL); cuda uses NCCL
PER_NODE=${PER_NODE:-8}                 # ranks per node: one per GPU / NPU
PORT=${PORT:-29500}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" --rdzv_id="$SLURM_JOB_ID" \
    -m rawnet_lib.train --config paper --device "$DEVICE" --devices "$PER_NODE" --nnodes "$SLURM_NNODES" \
    --fast false --amp bf16 --batch_size 96 "$@"
