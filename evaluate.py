"""Score a merged checkpoint (a plain timm model, no GLoRA code needed) on a dataset split.

    python evaluate.py --config configs/demo.yaml --checkpoint runs/demo/retrain/merged.safetensors --split test

Prints one JSON line: top-1 (and top-5 with more than 5 classes) accuracy and the image count.
"""

import sys

from engine.evaluate import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
