"""The adalora method (methods/adalora.py): its layer against PEFT's SVDLinear (forward and
gradients in float64), its count against PEFT's, the exact merge, and its training hooks driven by
engine.trainer.Trainer on the tiny ViT, step by step against PEFT's AdaLoraModel.update_and_allocate
fed the same parameters and gradients (importance averages, budget, masks, final rank pattern); the
penalty in the trainer's loss, and a stopped and resumed run equal to an uninterrupted one, bit for
bit. The math alone is tests/test_lorafamily_adalora.py."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import methods
from conftest import LARGE_SPACE, tiny_vit
from engine import distributed as dist
from engine.config import TrainConfig
from engine.tracker import Tracker
from engine.trainer import FAIL_AT_STEP_ENV, STOP_AT_STEP_ENV, Trainer
from methods.adalora import AdaLoraHooks, AdaLoraLinear, adalora_layers, effective_ranks
from methods.hooks import TrainingHooks
from supernet import SpaceError, load_space

peft = pytest.importorskip("peft")
F64 = torch.float64
INFO = dist.DistInfo()
SPACE = load_space(LARGE_SPACE)
ADALORA = methods.get("adalora")


def _adapted(seed=0, dtype=torch.float32, **settings):
    torch.manual_seed(seed)
    base = tiny_vit().to(dtype).eval()
    model = copy.deepcopy(base)
    s = ADALORA.settings(**settings)
    ADALORA.apply(model, s, SPACE)
    return base, model, s


class One(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("alpha", [8, 3, 0])
def test_layer_matches_peft_svd_linear_forward_and_gradients(alpha):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(One(7, 5).double(), peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=alpha, target_modules=["fc"], total_step=10)).double()
    svd = theirs.base_model.model.fc
    assert isinstance(svd, peft.tuners.adalora.SVDLinear)
    B, E, A = svd.lora_B["default"], svd.lora_E["default"], svd.lora_A["default"]
    mine = ADALORA.apply(One(7, 5).double(), ADALORA.settings(size=4, target_r=2, lora_alpha=alpha),
                         SimpleNamespace(targets=["fc"], exclude=[])).fc
    assert isinstance(mine, AdaLoraLinear)
    with torch.no_grad():
        mine.base.load_state_dict(svd.base_layer.state_dict())
        E.copy_(torch.randn_like(E))  # λ starts at zero: give every triplet a value
        mine.P.copy_(B), mine.lam.copy_(E[:, 0]), mine.Q.copy_(A)
    x = torch.randn(3, 6, 7, dtype=F64, requires_grad=True)
    y, want = mine(x), svd(x)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    w = torch.randn_like(want)
    got = torch.autograd.grad((y * w).sum(), [x, mine.P, mine.lam, mine.Q])
    exp = torch.autograd.grad((want * w).sum(), [x, B, E, A])
    for name, g, e in zip(("x", "P", "lam", "Q"), got, exp):
        assert (g - e.reshape(g.shape)).abs().max() <= 1e-10, name
        assert g.abs().max() > 0, name


def test_initialisation_starts_at_the_base_model_as_peft():
    base, model, s = _adapted(size=12)
    layers = adalora_layers(model)
    # every linear layer of the blocks, the classifier not
    assert [n for n, _ in layers] == [f"blocks.{b}.{p}" for b in range(2) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    P = torch.cat([layer.P.flatten() for _, layer in layers])
    assert all(torch.count_nonzero(layer.lam) == 0 for _, layer in layers)
    assert P.std().item() == pytest.approx(0.02, rel=0.05) and P.mean().abs() < 0.002  # N(0, 0.02²), as PEFT's
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), base(x), rtol=0, atol=0)
    assert layers[0][1].scale == pytest.approx(8 / 12)  # PEFT's default lora_alpha 8 over init_r


def test_count_is_the_trained_p_lambda_q_and_peft_s():
    _, model, _ = _adapted(size=6, target_r=2)
    layers = adalora_layers(model)
    want = sum(6 * (l.base.in_features + l.base.out_features + 1) for _, l in layers)
    assert ADALORA.count(model) == want
    # PEFT's AdaLoRA on the same layers trains as many (its ranknum is a frozen buffer-like parameter)
    shapes = [(l.base.in_features, l.base.out_features) for _, l in layers]

    class Mirror(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in shapes)

    theirs = peft.get_peft_model(Mirror(), peft.AdaLoraConfig(init_r=6, target_r=2, target_modules=r"layers\.\d+",
                                                               total_step=10))
    assert sum(p.numel() for n, p in theirs.named_parameters() if p.requires_grad) == want


def test_merge_is_exact_with_pruned_triplets_and_the_plain_model():
    _, model, _ = _adapted(dtype=F64, size=6, target_r=2)
    with torch.no_grad():
        for i, (_, layer) in enumerate(adalora_layers(model)):
            layer.lam.copy_(torch.randn_like(layer.lam))
            layer.lam[: i % 5] = 0  # pruned triplets, as the hooks leave them
            layer.P.add_(torch.randn_like(layer.P) * 0.1)
    ranks = effective_ranks(model)
    assert sorted(set(ranks.values())) == [2, 3, 4, 5, 6]
    x = torch.randn(3, 3, 32, 32, dtype=F64)
    with torch.no_grad():
        want = model.eval()(x)
        merged = ADALORA.merge(copy.deepcopy(model)).eval()
        torch.testing.assert_close(merged(x), want, rtol=0, atol=1e-10)
    assert not any(isinstance(m, AdaLoraLinear) for m in merged.modules())
    plain = tiny_vit().double()
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), want, rtol=0, atol=1e-10)


# -- training hooks, through engine.trainer.Trainer ---------------------------------------------------

def _trainer(out, model, hooks, epochs=2, **cfg):
    """A Trainer over 64 fixed random images in batches of 8: 8 steps per epoch."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 32, 32, generator=g, dtype=next(model.parameters()).dtype),
                                          torch.randint(0, 5, (64,), generator=g))
    args = dict(epochs=epochs, batch_size=8, lr=1e-2, warmup_epochs=0, weight_decay=1e-4)
    args.update(cfg)
    return Trainer(model, data, None, TrainConfig(**args), out, INFO, Tracker(out, enabled=False), hooks=hooks)


class PeftOracle:
    """PEFT's AdaLoraModel on linear layers shaped as the adapted ones; fed, after each optimizer
    step, the same P, λ, Q and gradients as AdaLoraHooks, it runs its own update_and_allocate."""

    def __init__(self, model, s, total_steps):
        self.layers = adalora_layers(model)
        shapes = [(l.base.in_features, l.base.out_features) for _, l in self.layers]

        class Mirror(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in shapes)

        self.peft = peft.get_peft_model(Mirror(), peft.AdaLoraConfig(
            init_r=s.init_r, target_r=s.target_r, lora_alpha=s.lora_alpha, target_modules=r"layers\.\d+",
            total_step=total_steps, tinit=s.tinit, tfinal=s.tfinal, deltaT=s.deltaT, beta1=s.beta1, beta2=s.beta2,
            orth_reg_weight=s.orth_reg_weight)).to(next(model.parameters()).dtype)
        self.svd = list(self.peft.base_model.model.layers)

    def factors(self, i):
        m = self.svd[i]
        return m.lora_B["default"], m.lora_E["default"], m.lora_A["default"]  # P, λ, Q

    def feed(self):
        with torch.no_grad():
            for i, (_, layer) in enumerate(self.layers):
                for theirs, ours in zip(self.factors(i), (layer.P, layer.lam, layer.Q)):
                    theirs.copy_(ours.reshape(theirs.shape))
                    theirs.grad = ours.grad.detach().clone().reshape(theirs.shape)

    def allocate(self, step):
        self.peft.base_model.update_and_allocate(step)

    def ema(self, i, part):
        alloc = self.peft.base_model.rankallocator
        key = f"layers.{i}.{ {'P': 'lora_B', 'lam': 'lora_E', 'Q': 'lora_A'}[part]}.default"
        return alloc.exp_avg_ipt.get(key), alloc.exp_avg_unc.get(key)


class Probe(TrainingHooks):
    """Calls ``fn(step, total_steps)`` after every optimizer step (placed around AdaLoraHooks)."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def after_step(self, model, step, total_steps):
        self.fn(step, total_steps)


@pytest.mark.parametrize("tinit,tfinal,delta_t", [(2, 3, 2), (0, 0, 1)])
def test_trainer_prunes_as_peft_to_the_target_budget(tmp_path, tinit, tfinal, delta_t):
    _, model, s = _adapted(dtype=F64, size=6, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=delta_t)
    hooks = AdaLoraHooks(model, s)
    n_paths = len(hooks.layers)
    assert (hooks.init_budget, hooks.target_budget) == (6 * n_paths, 2 * n_paths)
    oracle, log = None, []

    def before(step, total):
        nonlocal oracle
        oracle = oracle or PeftOracle(model, s, total)
        oracle.feed()

    def after(step, total):
        oracle.allocate(step)
        final = total - tfinal
        for i, (name, layer) in enumerate(hooks.layers):
            _, lam, _ = oracle.factors(i)
            assert torch.equal(layer.lam, lam[:, 0]), (step, name)  # the same λ left, the same zeroed
            for part in ("P", "lam", "Q"):
                ipt, unc = oracle.ema(i, part)
                if step < final:
                    assert torch.equal(hooks.avg_ipt[f"{name}.{part}"], ipt.reshape(-1 if part == "lam" else ipt.shape))
                    assert torch.equal(hooks.avg_unc[f"{name}.{part}"], unc.reshape(-1 if part == "lam" else unc.shape))
                else:  # both drop their averages at the final masking
                    assert ipt is None and f"{name}.{part}" not in hooks.avg_ipt
        budget, mask_now = hooks.budget(min(step, final), total)
        log.append((step, sum(effective_ranks(model).values()), budget if mask_now or step >= final else None))

    trainer = _trainer(tmp_path, model, [Probe("before", before), hooks, Probe("after", after)])
    assert trainer.total_steps == 16
    assert trainer.fit() == "done"
    assert len(log) == 16
    masked = [(step, left, budget) for step, left, budget in log if budget is not None]
    assert len(masked) >= 4
    assert len({budget for *_, budget in masked}) >= 3  # the cubic schedule falls through several budgets
    for step, left, budget in masked:  # scores are distinct: exactly the budget stays at each masking
        assert left == budget, (step, left, budget)
    for step, left, _ in log[: tinit + 1]:  # warm-up: nothing pruned
        assert left == 6 * n_paths
    assert log[-1][1] == 2 * n_paths  # the last step: target_r per path on average
    ranks = effective_ranks(model)
    assert len(set(ranks.values())) > 1, ranks  # the budget went unevenly across paths
    if tfinal:
        assert hooks.pattern is not None and sum(int(m.sum()) for m in hooks.pattern.values()) == 2 * n_paths


def test_the_penalty_is_in_the_trainers_loss(tmp_path):
    losses = {}
    for w in (0.5, 0.0):
        _, model, s = _adapted(dtype=F64, size=6, target_r=2, orth_reg_weight=w)
        hooks = AdaLoraHooks(model, s)
        if w:
            pairs = [(l.P, l.Q) for _, l in hooks.layers]
            norms = [torch.linalg.matrix_norm(P.T @ P - torch.eye(6, dtype=F64)) for P, _ in pairs]
            norms += [torch.linalg.matrix_norm(Q @ Q.T - torch.eye(6, dtype=F64)) for _, Q in pairs]
            penalty = w * sum(norms) / len(norms)  # PEFT's: the mean of the Frobenius norms, P's and Q's
            torch.testing.assert_close(hooks.extra_loss(model), penalty, rtol=1e-14, atol=0)
            assert penalty > 0.5  # factors of std 0.02 are far from orthonormal
        else:
            assert hooks.extra_loss(model) is None
        trainer = _trainer(tmp_path / str(w), model, [hooks], micro_batch_size=3)
        x, y = next(iter(trainer.loader))
        losses[w] = trainer.train_step(x, y)
    # once per batch (each micro-batch's share of it); without the penalty the loss sums in float32
    assert losses[0.5] - losses[0.0] == pytest.approx(penalty.item(), abs=1e-6)


def _state(model, hooks):
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return trained, hooks.state_dict()


# stopped in the pruning phase of a run that prunes to its end (the averages live on), or in the
# final phase of one with tfinal = 3 (the fixed pattern)
@pytest.mark.parametrize("stop_at,tfinal", [(5, 0), (15, 3)])
def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, stop_at, tfinal):
    settings = dict(dtype=F64, size=6, target_r=2, tinit=1, tfinal=tfinal, deltaT=2)
    _, model, s = _adapted(**settings)
    hooks = AdaLoraHooks(model, s)
    assert _trainer(tmp_path / "a", model, [hooks]).fit() == "done"
    want = _state(model, hooks)

    _, model, s = _adapted(**settings)
    monkeypatch.setenv(STOP_AT_STEP_ENV, str(stop_at))
    monkeypatch.delenv(FAIL_AT_STEP_ENV, raising=False)
    assert _trainer(tmp_path / "b", model, [AdaLoraHooks(model, s)]).fit() == "SIGTERM"
    monkeypatch.delenv(STOP_AT_STEP_ENV)
    _, model, s = _adapted(**settings)  # a fresh process: the model and hooks from scratch
    hooks = AdaLoraHooks(model, s)
    trainer = _trainer(tmp_path / "b", model, [hooks])
    assert trainer.resume("auto") and trainer.step == stop_at
    assert trainer.fit() == "done"
    got = _state(model, hooks)
    assert want[0].keys() == got[0].keys() and all(torch.equal(want[0][k], got[0][k]) for k in want[0])
    a, b = want[1], got[1]
    kept = ("pattern",) if tfinal else ("avg_ipt", "avg_unc")
    for key in kept:
        assert a[key] and a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["last_budget"] == b["last_budget"]


def test_the_importance_state_resumes_mid_pruning():
    """The averages are in the checkpoint's hook state: loading them restores the exact tensors."""
    _, model, s = _adapted(dtype=F64, size=4, target_r=2)
    hooks = AdaLoraHooks(model, s)
    for _, layer in hooks.layers:
        for p in (layer.P, layer.lam, layer.Q):
            p.grad = torch.randn_like(p)
    hooks.after_step(model, 0, 10)
    state = hooks.state_dict()
    assert state["avg_ipt"] and state["pattern"] is None
    twin = AdaLoraHooks(model, s)
    twin.load_state_dict(state)
    assert all(torch.equal(twin.avg_unc[k], hooks.avg_unc[k]) for k in hooks.avg_unc)
    other = AdaLoraHooks(_adapted(size=4, target_r=2)[1], s)
    state["avg_ipt"]["blocks.9.attn.qkv.P"] = torch.zeros(1)
    with pytest.raises(methods.MethodError, match="other layers"):
        other.load_state_dict(state)


def test_a_run_too_short_for_the_schedule_fails_in_one_line(tmp_path):
    from engine.trainer import TrainError

    _, model, s = _adapted(size=4, target_r=2, tinit=10, tfinal=6)
    with pytest.raises(TrainError) as err:  # refused when the trainer is built, before any step
        _trainer(tmp_path, model, [AdaLoraHooks(model, s)])  # 16 steps: 10 + 6 leave none
    msg = str(err.value)
    assert "\n" not in msg and "tinit (10)" in msg and "tfinal (6)" in msg and "16 training steps" in msg


def test_a_skipped_fp16_step_leaves_the_averages_alone():
    _, model, s = _adapted(size=4, target_r=2)
    hooks = AdaLoraHooks(model, s)
    for _, layer in hooks.layers:
        for p in (layer.P, layer.lam, layer.Q):
            p.grad = torch.ones_like(p)
    hooks.after_step(model, 0, 10)
    before = {k: v.clone() for k, v in hooks.avg_ipt.items()}
    hooks.layers[3][1].Q.grad[0, 0] = float("inf")
    hooks.after_step(model, 1, 10)
    assert all(torch.equal(before[k], hooks.avg_ipt[k]) for k in before)
    hooks.layers[3][1].Q.grad[0, 0] = 1.0
    hooks.after_step(model, 1, 10)
    assert not all(torch.equal(before[k], hooks.avg_ipt[k]) for k in before)


# -- settings and targets ------------------------------------------------------------------------------

@pytest.mark.parametrize("args,field", [
    ({"size": 0}, "init_r"), ({"size": 4, "target_r": 5}, "target_r"), ({"target_r": 0}, "target_r"),
    ({"tinit": -1}, "tinit"), ({"tfinal": 1.5}, "tfinal"), ({"deltaT": 0}, "deltaT"), ({"beta1": 1.0}, "beta1"),
    ({"beta2": 0}, "beta2"), ({"orth_reg_weight": -0.1}, "orth_reg_weight"), ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"lora_alpha": -1}, "lora_alpha"), ({"size": True}, "init_r"),
])
def test_settings_are_validated(args, field):
    with pytest.raises(methods.MethodError, match=rf"^{field}: "):
        ADALORA.settings(**args)


def test_defaults_are_peft_s():
    s, theirs = ADALORA.settings(), peft.AdaLoraConfig(total_step=10)
    for key in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "lora_alpha"):
        assert getattr(s, key) == getattr(theirs, key), key


def test_targets_follow_the_space_and_convolutions_are_refused():
    _, model, _ = _adapted(size=4, target_r=2)
    only = tiny_vit()
    ADALORA.apply(only, ADALORA.settings(size=4, target_r=2), SimpleNamespace(targets=["qkv"], exclude=["blocks.1.*"]))
    assert [n for n, _ in adalora_layers(only)] == ["blocks.0.attn.qkv"]
    with pytest.raises(methods.MethodError) as err:
        ADALORA.apply(tiny_vit(), ADALORA.settings(size=4, target_r=2), load_space(LARGE_SPACE.parent / "conv.yaml"))
    assert "\n" not in str(err.value) and "patch_embed.proj (Conv2d)" in str(err.value)
    with pytest.raises(SpaceError):
        ADALORA.apply(tiny_vit(), ADALORA.settings(size=4, target_r=2), SimpleNamespace(targets=["nothing"], exclude=[]))


def test_hooks_need_the_method_applied():
    with pytest.raises(methods.MethodError, match="no AdaLoRA layers"):
        AdaLoraHooks(tiny_vit(), ADALORA.settings())
    _, model, s = _adapted(size=4, target_r=2)
    assert [type(h) for h in ADALORA.hooks(model, s)] == [AdaLoraHooks]
