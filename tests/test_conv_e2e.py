"""train -> search -> retrain through the CLIs on a tiny timm CNN (MobileNetV3 with TF SAME padding:
depthwise, pointwise and squeeze-excite convolutions, with and without biases, timm's Conv2dSame), every
Conv2d and Linear adapted (configs/space/conv.yaml): the merged export equals the unmerged sub-network
and loads strictly into plain timm."""


import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import ROOT
from runcfg import run_cli as _run, write_config

pytestmark = pytest.mark.slow

MODEL = "tf_mobilenetv3_small_minimal_100"


def test_cnn_train_search_retrain_merge(tmp_path):
    from safetensors.torch import save_file

    from supernet import GLoraConv2d, create_merged_model, glora_layers, load_adapter, read_metadata

    # the backbone as a local checkpoint, so the test can rebuild the frozen network retrain started from
    torch.manual_seed(0)
    save_file(timm.create_model(MODEL, num_classes=4).state_dict(), str(tmp_path / "backbone.safetensors"))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", out, model={"name": MODEL, "pretrained": False, "kwargs": {},
                                                        "checkpoint": str(tmp_path / "backbone.safetensors")},
                       space=str(ROOT / "configs" / "space" / "conv.yaml"),
                       train={"epochs": 1, "reference_subnets": 0},
                       search={"population": 4, "top_k": 2, "mutation_count": 1, "crossover_count": 1, "generations": 2})
    _run("train.py", cfg)
    _run("search.py", cfg)
    _run("retrain.py", cfg)
    merged_path = out / "retrain" / "merged.safetensors"
    merged = create_merged_model(merged_path)  # plain timm, loaded strictly (with the biases the merge added)
    fresh = timm.create_model(MODEL, num_classes=4)
    assert [type(m) for m in merged.modules()] == [type(m) for m in fresh.modules()]  # Conv2dSame stays Conv2dSame
    # the unmerged sub-network: the backbone with the retrained adapter (GLoRA tensors, head, BN statistics)
    backbone = timm.create_model(MODEL, num_classes=4)
    backbone.load_state_dict(load_file(tmp_path / "backbone.safetensors"))
    unmerged = load_adapter(backbone, out / "retrain" / "adapter.safetensors").eval()
    convs = [n for n, m in glora_layers(unmerged) if isinstance(m, GLoraConv2d)]
    assert len(convs) > 20
    assert any(unmerged.get_submodule(n).groups > 1 for n in convs)  # depthwise convolutions are adapted
    assert any(unmerged.get_submodule(n).same_pad for n in convs)  # and timm's Conv2dSame
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        want, got = unmerged(x), merged(x)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    assert float(read_metadata(merged_path)["merge_max_abs_diff"]) <= 1e-3
