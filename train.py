"""Stage 1: train the weight-entangled GLoRA supernet (a sampled sub-network every step).

Single process:
    python train.py --config configs/demo.yaml
    python train.py --config configs/vtab1k.yaml --set data.task=cifar --set train.lr=5e-4
One node, 4 GPUs (or CPU processes with gloo):
    torchrun --nproc_per_node 4 train.py --config configs/vtab1k.yaml
Many nodes:
    torchrun --nnodes 2 --node_rank $RANK --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HOST:29500 train.py --config ...
Resume: rerun the same command (train.resume: auto is the default).
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main("train", doc=__doc__))
