"""Score a merged checkpoint (a plain timm model, no GLoRA code needed) on a dataset split.

    python evaluate.py --config configs/demo.yaml --checkpoint runs/demo/retrain/merged.safetensors --split test

Prints one JSON line: top-1 (and top-5 with more than 5 classes) accuracy and the image count.
Out-of-domain test sets, as plain <class>/<image> folders (one JSON line each):

    python evaluate.py --config configs/fewshot.yaml --set data.dataset=imagenet \\
        --checkpoint runs/fewshot/retrain/merged.safetensors --folder data/imagenetv2 --folder data/imagenet-sketch --folder data/imagenet-a --folder data/imagenet-r

Class folders are matched to the model's outputs by the run's own class names (or --classes FILE); folders
named 0, 1, ... are output indices (ImageNet-V2). A folder holding only some classes (ImageNet-A, -R: 200
of 1000) is scored among those classes only, unless --all-classes.
"""

import sys

from engine.evaluate import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
