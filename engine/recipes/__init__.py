"""The three stages, one recipe each: supernet training (:mod:`.train`), evolutionary search
(:mod:`.search`), retraining with merge and export (:mod:`.retrain`).

Each ``run_*`` takes a validated :class:`~engine.config.RunConfig` and the distributed info, and
returns ``"done"`` or the name of the signal that interrupted it (after a checkpoint was saved).
Directory layout under ``output_dir``::

    config.yaml  supernet.safetensors  supernet.yaml  checkpoints/last.pt  tb/  metrics.jsonl
    search/   config.yaml  state.pt  result.yaml  history.jsonl  pareto.png  tb/
    retrain/  config.yaml  checkpoints/last.pt  adapter.safetensors  subnet.yaml  merged.safetensors  metrics.json  tb/
"""
