"""Stage 2: evolutionary search for the best sub-network under a parameter budget.

Scores come from the validation split only, with the supernet's shared weights merged per
candidate into a plain model.

    python search.py --config configs/demo.yaml --set search.max_params=20000
    torchrun --nproc_per_node 4 search.py --config configs/vtab1k.yaml   # candidates split across ranks
Resume: rerun the same command (search.resume: auto).
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main("search", doc=__doc__))
