"""Biases a merge added to bias-free convolutions, folded into the batch norm that reads them."""

import timm
import torch
import torch.nn as nn

from supernet import added_biases, apply_glora, merge_glora, sample_subnet
from supernet.fold import fold_biases_into_norms

SPACE = {"targets": "all-conv", "exclude": ["head"],
         "choices": {"A": ["vector"], "B": ["lora2"], "C": ["vector"], "D": ["none"], "E": ["vector"]}}


def _trained_merge(name, **kw):
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=5, **kw).eval()
    for m in base.modules():  # statistics other than the identity, so a wrong fold shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    model = timm.create_model(name, num_classes=5, **kw)
    model.load_state_dict(base.state_dict())
    apply_glora(model, SPACE)
    sample_subnet(model, torch.Generator().manual_seed(0))
    for n, p in model.named_parameters():
        if "glora_" in n:
            p.data.normal_(0, 0.05)
    model.eval()
    gained = added_biases(model)
    return base, merge_glora(model), gained


def test_fold_makes_a_merged_cnn_the_plain_architecture():
    base, merged, gained = _trained_merge("tf_efficientnet_lite0")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = merged(x)
    assert len(gained) == 49  # every convolution is bias-free; C and E gave each one
    folded = fold_biases_into_norms(merged, gained, x)
    assert folded == sorted(gained)
    with torch.no_grad():
        got = merged(x)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item())
    plain = timm.create_model("tf_efficientnet_lite0", num_classes=5).eval()
    plain.load_state_dict(merged.state_dict(), strict=True)  # no added keys left
    with torch.no_grad():
        assert torch.allclose(plain(x), want, atol=1e-4 * want.abs().max().item())


def test_no_fold_where_the_output_goes_elsewhere_too():
    """A conv whose output feeds a batch norm and also a residual: moving its bias into the norm
    would change the residual path, so the outputs differ and nothing is folded."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=True)
            self.bn = nn.BatchNorm2d(3).eval()

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    net = Net().eval()
    nn.init.normal_(net.conv.bias)
    bias = net.conv.bias.detach().clone()
    x = torch.randn(2, 3, 8, 8)
    assert fold_biases_into_norms(net, ["conv"], x) == []
    assert torch.equal(net.conv.bias, bias) and torch.equal(net.bn.running_mean, torch.zeros(3))


def test_no_fold_without_a_norm_or_names():
    lin = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4)
    assert fold_biases_into_norms(lin, ["0"], x) == [] and lin[0].bias is not None
    assert fold_biases_into_norms(lin, [], x) == []
