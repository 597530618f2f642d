"""Run by torchrun in tests: one rank of a stage, then each rank dumps what it saw for comparison.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py STAGE CONFIG DUMP_DIR

The ``retrain`` stage takes several configs, comma-separated, and retrains each in turn in one
process group (one start-up for every method).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine import distributed as dist  # noqa: E402
from engine.recipes import retrain as retrain_recipe  # noqa: E402
from engine.recipes import search as search_recipe  # noqa: E402
from engine.recipes import train as train_recipe  # noqa: E402
from engine.config import load_config  # noqa: E402


def main() -> None:
    stage, config, dump = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    info = dist.setup("cpu")
    if stage == "retrain":
        statuses = [retrain_recipe.run_retrain(load_config(c), info, c) for c in config.split(",")]
        (dump / f"rank{info.rank}.json").write_text(json.dumps({"status": statuses, "rank": info.rank}))
        dist.cleanup()
        return
    cfg = load_config(config)
    tags = []
    if stage == "crash":
        # rank 1 fails at its second step; rank 0 would wait in the next all-reduce forever if the
        # launcher did not end the job.
        original_step = train_recipe.Trainer.train_step

        def failing(self, x, y):
            if info.rank == 1 and self.step == 1:
                raise RuntimeError("injected failure on rank 1")
            return original_step(self, x, y)

        train_recipe.Trainer.train_step = failing
        train_recipe.run_train(cfg, info, config)
        return
    if stage == "train":
        # record the sub-network every step on every rank
        import supernet

        original = supernet.SubnetSampler.__call__

        def recording(self, gen, activate=True):
            out = original(self, gen, activate)
            if activate:
                tags.append(train_recipe.subnet_tag(cfg.supernet, out))
            return out

        supernet.SubnetSampler.__call__ = recording
        captured = {}
        original_fit = train_recipe.Trainer.fit

        def fit(self):
            status = original_fit(self)
            captured.update(self.trainable_state())
            captured["__epochs_indices__"] = torch.tensor(list(self.sampler.inner))
            return status

        train_recipe.Trainer.fit = fit
        status = train_recipe.run_train(cfg, info, config)
        torch.save(captured, dump / f"rank{info.rank}.pt")
    else:
        status = search_recipe.run_search(cfg, info, config)
    (dump / f"rank{info.rank}.json").write_text(json.dumps({"status": status, "tags": tags, "rank": info.rank}))
    dist.cleanup()


if __name__ == "__main__":
    main()
