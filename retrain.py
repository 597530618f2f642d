"""Stage 3: retrain the chosen sub-network (or a preset baseline), test it, merge and export it.

    python retrain.py --config configs/demo.yaml                          # search/result.yaml
    python retrain.py --config configs/demo.yaml --set retrain.preset=lora --set output_dir=runs/demo-lora
    torchrun --nproc_per_node 4 retrain.py --config configs/vtab1k.yaml
Outputs in <output_dir>/retrain/: merged.safetensors (a plain timm model), adapter.safetensors +
subnet.yaml, metrics.json.
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main("retrain", doc=__doc__))
