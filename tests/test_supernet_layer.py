"""The GLoRA layer against the dense formula of docs/method.md §1, for every configuration of the largest space."""

import contextlib
import itertools
import math

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from supernet import TENSORS, GLoraLinear, LayerChoice, load_space
from supernet.layer import choice_cost

from conftest import LARGE_SPACE, needs_cxx


def _randomise(layer: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def _expected_support(layer: GLoraLinear, c: LayerChoice):
    """docs/method.md §2's table, written out from the raw shared parameters."""
    out_f, in_f = layer.out_features, layer.in_features
    dt = layer.weight.dtype

    def ab(t):
        ch = c[t]
        d, u = getattr(layer, f"glora_{t}d"), getattr(layer, f"glora_{t}u")
        if ch.kind == "lora":
            return d[:, : ch.rank] @ u[: ch.rank, :]
        if ch.kind == "vector":
            return d[:, 0:1].expand(out_f, in_f)
        if ch.kind == "scalar":
            return d[0, 0].expand(out_f, in_f)
        return torch.zeros(out_f, in_f, dtype=dt)

    def cvec():
        ch = c.C
        if ch.kind == "lora":
            return layer.glora_Cd[:, : ch.rank] @ layer.glora_Cu[: ch.rank, :]
        if ch.kind == "vector":
            return layer.glora_Cd[:, 0:1]
        return torch.zeros(in_f, 1, dtype=dt)

    def de(t):
        ch, p = c[t], getattr(layer, f"glora_{t}")
        if ch.kind == "vector":
            return p
        if ch.kind == "scalar":
            return p[0].expand(out_f)
        return torch.zeros(out_f, dtype=dt)

    return ab("A"), ab("B"), cvec(), de("D"), de("E")


def _random_layer(bias: bool, seed: int):
    """A float64 7 -> 5 layer over the largest space with random adapters, its generator, W0 and b0 (zeros without a bias)."""
    torch.manual_seed(0)
    base = nn.Linear(7, 5, bias=bias).double()
    layer = GLoraLinear(base, load_space(LARGE_SPACE).choices)
    gen = torch.Generator().manual_seed(seed)
    _randomise(layer, gen)
    return layer, gen, base.weight, base.bias if bias else torch.zeros(5, dtype=torch.float64)


def _dense_output(x, W0, b0, A, B, C, D, E):
    """docs/method.md §1: ``(W0 + W0 ⊙ A + B) x + (b0 + b0 ⊙ D + E + W0 C)``."""
    return x @ (W0 + W0 * A + B).T + (b0 + b0 * D + E + (W0 @ C).squeeze(-1))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_every_configuration_matches_dense_formula(bias):
    layer, gen, W0, b0 = _random_layer(bias, seed=1)
    x = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64)
    combos = list(itertools.product(*(layer.choices[t] for t in TENSORS)))
    assert len(combos) == (900 if bias else 300)
    for combo in combos:
        c = LayerChoice(*combo)
        layer.set_choice(c)
        A, B, C, D, E = _expected_support(layer, c)
        s = layer.support_tensors()
        for got, want in zip(s, (A, B, C, D, E)):
            torch.testing.assert_close(got.expand_as(want), want, atol=1e-12, rtol=0)
        # The formula, from support_tensors() and the frozen weights only.
        want = _dense_output(x, W0, b0, *s)
        got = layer(x)
        assert (got - want).abs().max().item() <= 1e-10, str(c)
        Wm, bm = layer.merged_weight_bias()
        merged = x @ Wm.T + (bm if bm is not None else 0)
        assert (merged - want).abs().max().item() <= 1e-10, str(c)
        # out=: the same numbers written into given tensors (NaN-filled, so every element must be
        # written); a float32 target gets them cast
        bm_or_0 = torch.zeros(5, dtype=torch.float64) if bm is None else bm
        for dt in (torch.float64, torch.float32):
            out = (torch.full((5, 7), float("nan"), dtype=dt), torch.full((5,), float("nan"), dtype=dt))
            got_out = layer.merged_weight_bias(out=out)
            assert got_out[0] is out[0] and got_out[1] is out[1]
            assert torch.equal(out[0], Wm.to(dt)) and torch.equal(out[1], bm_or_0.to(dt)), (str(c), dt)
    with pytest.raises(ValueError, match="frozen weight or bias"):
        layer.merged_weight_bias(out=(layer.weight.detach(), None))
    # non-trivial: some configuration must actually change the output
    layer.set_choice(LayerChoice(*combos[0]))
    assert (layer(x) - (x @ W0.T + b0)).abs().max() > 1e-3


@pytest.mark.parametrize("bias", [True, False])
def test_fresh_layer_equals_base(bias):
    space = load_space(LARGE_SPACE)
    base = nn.Linear(6, 4, bias=bias)
    layer = GLoraLinear(base, space.choices)
    x = torch.randn(5, 6)
    for combo in itertools.product(*(layer.choices[t] for t in TENSORS)):
        layer.set_choice(LayerChoice(*combo))
        assert torch.equal(layer(x), base(x))


def test_initialisation_follows_spec():
    space = load_space(LARGE_SPACE)
    layer = GLoraLinear(nn.Linear(16, 12), space.choices)
    for t in "ABC":
        assert torch.count_nonzero(getattr(layer, f"glora_{t}d")) == 0
        up = getattr(layer, f"glora_{t}u")
        assert up.shape[0] == 8 and torch.count_nonzero(up) == up.numel()
    assert layer.glora_Ad.shape == (12, 8) and layer.glora_Au.shape == (8, 16)
    assert layer.glora_Cd.shape == (16, 8) and layer.glora_Cu.shape == (8, 1)
    assert layer.glora_D.shape == (12,) and torch.count_nonzero(layer.glora_D) == 0
    assert layer.glora_E.shape == (12,) and torch.count_nonzero(layer.glora_E) == 0


@pytest.mark.parametrize(
    "tensor,choice,expected",
    [("A", "lora4", 4 * (12 + 16)), ("B", "vector", 12), ("B", "scalar", 1), ("C", "lora8", 8 * 17),
     ("C", "vector", 16), ("D", "vector", 12), ("E", "scalar", 1), ("A", "none", 0)],
)
def test_choice_cost_table(tensor, choice, expected):
    from supernet import parse_choice

    assert choice_cost(tensor, parse_choice(choice, tensor), 12, 16) == expected


def test_illegal_choice_on_layer_names_tensor():
    from supernet import SpaceError

    layer = GLoraLinear(nn.Linear(4, 4, bias=False), load_space(LARGE_SPACE).choices)
    with pytest.raises(SpaceError, match=r"fc\.D.*no bias"):
        layer.set_choice({"A": "none", "B": "none", "C": "none", "D": "vector", "E": "none"}, "fc")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_every_configuration_gradients_match_dense_formula(bias):
    """Input and adapter gradients of the fast paths equal autograd through the dense formula of docs/method.md §1."""
    layer, gen, W0, b0 = _random_layer(bias, seed=2)
    params = layer.adapter_parameters()
    x = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)  # a loss that weighs every output differently
    checked = 0
    for combo in itertools.product(*(layer.choices[t] for t in TENSORS)):
        c = LayerChoice(*combo)
        layer.set_choice(c)
        got = torch.autograd.grad((layer(x) * weights).sum(), [x, *params], allow_unused=True)
        want_y = _dense_output(x, W0, b0, *_expected_support(layer, c))
        want = torch.autograd.grad((want_y * weights).sum(), [x, *params], allow_unused=True)
        names = ["x"] + [n for n, p in layer.named_parameters() if n.startswith("glora_")]
        for name, g, w in zip(names, got, want):
            # an inactive tensor gets no gradient, or an exactly zero one
            g = torch.zeros_like(w if w is not None else x if name == "x" else getattr(layer, name)) if g is None else g
            w = torch.zeros_like(g) if w is None else w
            assert (g - w).abs().max().item() <= 1e-10, f"{c}: gradient of {name}"
        checked += 1
    assert checked == (900 if bias else 300)


class GpuAutocastRules(TorchDispatchMode):
    """The rules of a GPU's autocast that a CPU's lacks and that touch this layer's ops, applied
    below CPU autocast (a dispatch mode sees each op after autocast has had it), so the CPU tests
    meet the dtypes a GPU would: ``mv``, ``addmv`` and ``addr`` run in the low-precision dtype,
    and ``sum`` without a dtype sums in fp32. Both once broke the GPU's autocast path (H200,
    torch 2.11) while every CPU test passed. Enter it inside ``torch.autocast`` (below autocast,
    autocast reads as off, so the rules apply to every op the mode sees: the out= forms are other
    overloads, which autocast leaves alone too)."""

    LOW = {torch.ops.aten.mv.default, torch.ops.aten.addmv.default, torch.ops.aten.addr.default}
    SUMS = {torch.ops.aten.sum.default, torch.ops.aten.sum.dim_IntList}

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.LOW:
            args = tuple(a.to(self.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        elif func in self.SUMS and kwargs.get("dtype") is None and args[0].dtype in (torch.bfloat16, torch.float16):
            kwargs["dtype"] = torch.float32
        return func(*args, **kwargs)


def check_autocast_gradients(device: str, dtype: torch.dtype, gpu_rules: bool = False) -> None:
    """Under autocast every configuration trains its fp32 parameters with low-precision error only."""
    space = load_space(LARGE_SPACE)
    torch.manual_seed(0)
    layer = GLoraLinear(nn.Linear(64, 48), space.choices).to(device)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_(0, 0.1)
    x = torch.randn(4, 10, 64, device=device, requires_grad=True)
    weights = torch.randn(4, 10, 48, device=device).to(dtype).float()  # exact in dtype, so the output gradient is not rounded
    for combo in itertools.product(*(layer.choices[t] for t in TENSORS)):
        c = LayerChoice(*combo)
        layer.set_choice(c)
        inputs = [x, *layer.adapter_parameters()]
        want = torch.autograd.grad((layer(x) * weights).sum(), inputs, allow_unused=True)
        with torch.autocast(device, dtype=dtype), GpuAutocastRules(dtype) if gpu_rules else contextlib.nullcontext():
            y = layer(x)
        assert y.dtype == dtype, str(c)
        got = torch.autograd.grad((y.float() * weights).sum(), inputs, allow_unused=True)
        for g, w in zip(got, want):
            if w is None:
                assert g is None or not g.any(), str(c)
                continue
            assert g.dtype == torch.float32, str(c)
            assert (g - w).abs().max() <= 2e-2 * w.abs().max(), str(c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_gradients_reach_fp32_parameters(dtype):
    check_autocast_gradients("cpu", dtype)


def test_autocast_under_a_gpus_rules():
    """The same with a GPU's extra autocast rules emulated on the CPU (see GpuAutocastRules)."""
    check_autocast_gradients("cpu", torch.bfloat16, gpu_rules=True)


def test_autocast_casts_no_weight_sized_adapter_tensor():
    """Under autocast the adapters' own products run in their dtype (the out= forms autocast leaves
    alone): a layer casts its input, the frozen weight where F.linear does, and small tensors only.
    Before, autocast cast every operand of ``Ad Au`` and ``W0 + Bd Bu``, the frozen weight among them."""
    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_to_copy":
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    space = load_space(LARGE_SPACE)
    layer = GLoraLinear(nn.Linear(64, 48), space.choices)
    x = torch.randn(2, 5, 64)
    for combo in itertools.product(*(layer.choices[t] for t in TENSORS)):
        c = LayerChoice(*combo)
        layer.set_choice(c)
        with Casts() as casts, torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        weight_sized = [s for s in casts.shapes if s == (48, 64)]
        small = [s for s in casts.shapes if s not in ((48, 64), (2, 5, 64))]
        assert casts.shapes.count((2, 5, 64)) == 1, (str(c), casts.shapes)  # the input, once
        assert all(math.prod(s) <= 8 * 64 for s in small), (str(c), casts.shapes)  # (out,) or rank-sized (r x in, out x r)
        # A lora A writes its dense weight in bf16 by the last op and hands F.linear bf16 inputs;
        # otherwise F.linear casts W0 itself (as it does for a frozen layer)
        assert len(weight_sized) == (0 if c.A.kind == "lora" else 1), (str(c), casts.shapes)
        assert len(small) <= 3, (str(c), casts.shapes)


def _configuration_stack(sliced: bool) -> nn.Sequential:
    """16 layers in a row, one per (A, B) pair of kinds, C/D/E cycling through theirs and every
    fourth layer without a bias: each configuration's forward and hand-written backward in one
    model, so one compile covers them all. ``sliced``: every layer holds the whole space and uses
    a leading slice (a supernet); else each holds just its choice (an extracted sub-network)."""
    space = {"A": ["none", "vector", "scalar", "lora4", "lora6"], "B": ["none", "vector", "scalar", "lora4", "lora6"],
             "C": ["none", "vector", "lora4", "lora6"], "D": ["none", "vector", "scalar"], "E": ["none", "vector", "scalar"]}
    layers = []
    for i, (a, b) in enumerate(itertools.product(["none", "vector", "scalar", "lora4"], repeat=2)):
        bias = i % 4 != 3
        pick = dict(A=a, B=b, C=["none", "vector", "lora4"][i % 3], D="none" if not bias else ["vector", "scalar", "none"][i % 3], E=["scalar", "none", "vector"][i % 3])
        layer = GLoraLinear(nn.Linear(24, 24, bias=bias), space if sliced else {t: [c] for t, c in pick.items()})
        layer.set_choice(pick)
        layers.append(layer)
    return nn.Sequential(*layers)


@needs_cxx
@pytest.mark.parametrize("sliced", [False, True], ids=["subnet", "supernet"])
def test_compiled_layers_match_eager(sliced):
    """retrain.compile and search.compile run these autograd functions under torch.compile: every
    kind of A and B, with C, D, E, gives the eager outputs and gradients. Written after torch
    2.11 compiled B's in-place vector update into a graph whose gradients were all zero."""
    check_compiled_layers("cpu", sliced)


def check_compiled_layers(device: str, sliced: bool, amp: torch.dtype | None = None) -> None:
    """Compiled against eager. Under autocast to ``amp`` the two round in different places, so
    each is measured against the fp32 eager result: the compiled one may not be much further off
    than the eager one (relative norm). Eager is the noisier one where a gradient sums many terms
    of both signs, such as a scalar B's: Inductor keeps the intermediate values in fp32."""
    torch.manual_seed(0)
    model = _configuration_stack(sliced).to(device)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    x = torch.randn(2, 5, 24, device=device)
    w = torch.randn(2, 5, 24, device=device)
    results = []
    runs = [(model, None), (torch.compile(model), amp)] + ([(model, amp)] if amp else [])
    for run, dtype in runs:
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext():
            y = run(xi)
        (y.float() * w).sum().backward()
        results.append({"y": y.detach(), "x": xi.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}})
    eager, compiled = results[:2]
    assert set(eager) == set(compiled) and len(eager) > 40
    for k, v in eager.items():
        assert v.norm() > 0, k
        if amp:
            def error(r, k=k, v=v):
                return ((r[k].float() - v.float()).norm() / v.float().norm()).item()

            assert compiled[k].dtype == results[2][k].dtype, k
            assert error(compiled) <= max(0.05, 1.5 * error(results[2])), (k, error(compiled), error(results[2]))
        else:
            torch.testing.assert_close(compiled[k], v, rtol=1e-4, atol=1e-5 * v.abs().max().item(), msg=lambda m, k=k: f"{k}: {m}")


@needs_cxx
def test_compiled_layers_match_eager_under_bf16_autocast():
    """The same stack compiled under bf16 autocast (as retrain.compile with precision bf16)."""
    check_compiled_layers("cpu", sliced=False, amp=torch.bfloat16)
