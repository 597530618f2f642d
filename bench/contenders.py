"""The models being compared, all built from one base model so they share its weights.

Every training contender is a :class:`Contender`: a model plus a ``before`` hook run at the start
of each step (the supernet draws a fresh sub-network there). :func:`train_step` turns one into a
callable that runs forward + cross-entropy + backward + AdamW step.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.compiling import compile_model, uses_cuda_graphs
from engine.optim import adamw
from supernet import SubnetSampler, apply_glora, classifier_names, extract_subnet, merge_glora, sample_subnet, uniform_subnet
from supernet.model import find_targets
from supernet.space import load_space

ROOT = Path(__file__).resolve().parents[1]
LARGE_SPACE = ROOT / "configs" / "space" / "large.yaml"

SUBNET_LORA = dict(A="lora8", B="lora8", C="lora8", D="scalar", E="scalar")
SUBNET_VECTOR = dict(A="vector", B="vector", C="vector", D="vector", E="vector")
PEFT_GLORA = {
    "lora": dict(config_A_B="lora", config_C="lora", config_D_E="constant"),
    "vector": dict(config_A_B="vector", config_C="vector", config_D_E="vector"),
}

TRAIN_CONTENDERS = ("peft_lora", "supernet", "subnet_lora", "peft_glora_lora", "subnet_vector", "peft_glora_vector", "frozen",
                    "conv_subnet_lora", "peft_lora_conv")

# The convolution benchmark (docs/convolutions.md): a sub-network with B = lora8 only (LoRA) on
# every ungrouped convolution of a CNN, against PEFT's LoRA on the same convolutions.
CONV_SUBNET_LORA = {"A": ["none"], "B": ["lora8"], "C": ["none"], "D": ["none"], "E": ["none"]}


@dataclass(frozen=True)
class ModelSpec:
    """A randomly initialised timm model (``pretrained=False``), rebuilt identically from ``seed``."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    num_classes: int = 100

    @property
    def label(self) -> str:
        return self.name if not self.kwargs else f"{self.name}({','.join(f'{k}={v}' for k, v in sorted(self.kwargs.items()))})"

    def build(self, seed: int = 0) -> nn.Module:
        import timm

        torch.manual_seed(seed)
        model = timm.create_model(self.name, pretrained=False, num_classes=self.num_classes, **self.kwargs)
        return model.eval()

    def to_json(self) -> dict[str, Any]:
        return dict(name=self.name, kwargs=dict(self.kwargs), img_size=self.img_size, num_classes=self.num_classes)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(name=d["name"], kwargs=dict(d.get("kwargs", {})), img_size=int(d["img_size"]), num_classes=int(d["num_classes"]))


@dataclass
class Contender:
    name: str
    model: nn.Module
    before: Callable[[], None] | None = None
    compile_mode: str | None = None  # set when the model is wrapped by torch.compile


def target_names(base: nn.Module) -> list[str]:
    """All linear layers except the classifier: exactly what ``configs/space/large.yaml`` adapts."""
    return find_targets(base, load_space(LARGE_SPACE))


def head_names(base: nn.Module) -> list[str]:
    return classifier_names(base)


def _train_only(model: nn.Module, heads: list[str], extra: Callable[[str], bool]) -> nn.Module:
    """Freeze every parameter but the head's and those ``extra(name)`` selects."""
    for name, p in model.named_parameters():
        p.requires_grad_(any(name == h or name.startswith(h + ".") for h in heads) or extra(name))
    return model


def _peft(base: nn.Module, config) -> nn.Module:
    """``peft.inject_adapter_in_model`` on a copy; train the adapters and the head, as ours does."""
    import peft

    model = peft.inject_adapter_in_model(config, copy.deepcopy(base))
    return _train_only(model, head_names(base), lambda name: "lora_" in name)  # lora_A/lora_B, glora_A..glora_E


def peft_lora(base: nn.Module) -> nn.Module:
    import peft

    return _peft(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target_names(base)))


def peft_glora(base: nn.Module, kind: str) -> nn.Module:
    import peft

    return _peft(base, peft.GloraConfig(r=8, target_modules=target_names(base), **PEFT_GLORA[kind]))


def supernet(base: nn.Module) -> nn.Module:
    return apply_glora(copy.deepcopy(base), LARGE_SPACE)


def subnet(base: nn.Module, choice: dict[str, str]) -> nn.Module:
    model = supernet(base)
    return extract_subnet(model, uniform_subnet(model, choice))


def merged(base: nn.Module, seed: int = 0) -> nn.Module:
    """A random sub-network of the supernet, merged into plain linear layers."""
    model = supernet(base)
    sample_subnet(model, torch.Generator().manual_seed(seed))
    return merge_glora(model).eval()


def conv_target_names(base: nn.Module) -> list[str]:
    """The ungrouped convolutions outside the classifier: the layers both convolution contenders adapt
    (PEFT's LoRA has no grouped form)."""
    space = load_space({"targets": "all-conv", "choices": CONV_SUBNET_LORA})
    return [n for n in find_targets(base, space) if base.get_submodule(n).groups == 1]


def conv_subnet_lora(base: nn.Module) -> nn.Module:
    """Our sub-network with B = lora8 only on :func:`conv_target_names`: the two-convolution low-rank path."""
    import re

    names = conv_target_names(base)
    return apply_glora(copy.deepcopy(base), {"targets": [re.escape(n) for n in names], "choices": CONV_SUBNET_LORA})


def peft_lora_conv(base: nn.Module) -> nn.Module:
    import peft

    return _peft(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=conv_target_names(base)))


def merged_conv(base: nn.Module, seed: int = 0) -> nn.Module:
    """A random sub-network of the supernet over every convolution and linear layer (configs/space/conv.yaml), merged."""
    model = apply_glora(copy.deepcopy(base), ROOT / "configs" / "space" / "conv.yaml")
    sample_subnet(model, torch.Generator().manual_seed(seed))
    return merge_glora(model).eval()


def frozen(base: nn.Module) -> nn.Module:
    """The base model with every weight frozen that still back-propagates to its first block.

    Only the head and the position embedding train, so a step is the forward pass, the input
    gradient of every linear layer and nothing else: what any adapter that trains no weight
    matrix must at least pay (the floor of the vector sub-network), and a reference for how
    much of a step the frozen model's own work (attention, GELU, LayerNorm) takes.
    """
    model = copy.deepcopy(base)
    probe = "pos_embed" if hasattr(model, "pos_embed") else next(n for n, _ in model.named_parameters() if n.endswith("bias"))
    return _train_only(model, head_names(base), lambda name: name == probe)


def build_train_contender(name: str, base: nn.Module, seed: int = 0, compile: bool | str = False) -> Contender:
    """``compile``: False, True (torch.compile's default mode) or a mode of ``engine.compiling.COMPILE_MODES``."""
    c = _build_train_contender(name, base, seed)
    if compile:
        if c.before is not None:
            raise ValueError(f"{name}: changes its sub-network every step, which torch.compile would recompile for")
        # shares the parameters; the first step compiles (a warm-up round)
        c.compile_mode = "default" if compile is True else compile
        c.model = compile_model(c.model, c.compile_mode)
    return c


def _build_train_contender(name: str, base: nn.Module, seed: int = 0) -> Contender:
    if name == "peft_lora":
        return Contender(name, peft_lora(base))
    if name == "supernet":
        model = supernet(base)
        gen, sampler = torch.Generator().manual_seed(seed), SubnetSampler(model)  # as the trainer draws
        return Contender(name, model, before=lambda: sampler(gen))
    if name == "subnet_lora":
        return Contender(name, subnet(base, SUBNET_LORA))
    if name == "subnet_vector":
        return Contender(name, subnet(base, SUBNET_VECTOR))
    if name == "peft_glora_lora":
        return Contender(name, peft_glora(base, "lora"))
    if name == "peft_glora_vector":
        return Contender(name, peft_glora(base, "vector"))
    if name == "frozen":
        return Contender(name, frozen(base))
    if name == "conv_subnet_lora":
        return Contender(name, conv_subnet_lora(base))
    if name == "peft_lora_conv":
        return Contender(name, peft_lora_conv(base))
    raise ValueError(f"unknown training contender {name!r}; known: {', '.join(TRAIN_CONTENDERS)}")


# Largest relative difference (norm of the difference over the norm, all trainable gradients
# together) allowed between a compiled contender's first step and the eager one's. bf16 rounding
# in a different order stays far below it; a graph that computes something else does not (torch
# 2.11 once compiled a vector B into zero gradients, and a zero-gradient step times fast).
COMPILED_GRAD_TOL = 0.05


def gradient_difference(eager: nn.Module, compiled: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = False, cuda_graphs: bool = False) -> float:
    """Relative difference of one training step's gradients, ``compiled`` against ``eager``, over
    the trainable parameters of ``eager`` (which ``compiled`` shares when it wraps it)."""
    params = [p for p in eager.parameters() if p.requires_grad]
    device = x.device.type
    flat = []
    for model in (eager, compiled):
        if cuda_graphs and model is compiled:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)  # unused: no gradient reaches it, a zero
        flat.append(torch.cat([(torch.zeros_like(p) if g is None else g).float().flatten() for g, p in zip(grads, params)]))
    return ((flat[1] - flat[0]).norm() / flat[0].norm().clamp_min(1e-30)).item()


def check_compiled(c: Contender, x: torch.Tensor, y: torch.Tensor, amp: bool = False) -> float:
    """A compiled contender's first step against its eager model's: raises rather than let a
    compiled graph that computes something else be timed. Returns the relative difference."""
    eager = getattr(c.model, "_orig_mod", None)
    if c.compile_mode is None or eager is None:
        raise ValueError(f"{c.name}: not compiled")
    c.model.to(x.device).train()
    diff = gradient_difference(eager, c.model, x, y, amp, uses_cuda_graphs(c.compile_mode, x.device))
    if not diff <= COMPILED_GRAD_TOL:
        raise RuntimeError(f"{c.name}: compiled ({c.compile_mode}) gradients differ from eager by {diff:.3g} "
                           f"(relative; at most {COMPILED_GRAD_TOL} expected): the compiled step is wrong, so it is not timed")
    return diff


def autocast(device: str, amp: bool):
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def train_step(c: Contender, x: torch.Tensor, y: torch.Tensor, amp: bool = False) -> Callable[[], None]:
    """One training step: forward + cross-entropy + backward + AdamW (``engine.optim.adamw``) over the trainable parameters."""
    model = c.model.to(x.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=1e-4, weight_decay=1e-4)  # the trainer's optimiser, for every contender
    device = x.device.type

    # a contender compiled to replay CUDA graphs marks each step, as the trainer does
    mark = c.compile_mode is not None and uses_cuda_graphs(c.compile_mode, x.device)

    def step() -> None:
        if c.before is not None:
            c.before()
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def forward_fn(model: nn.Module, x: torch.Tensor, amp: bool = False) -> Callable[[], None]:
    model = model.to(x.device).eval()
    device = x.device.type

    def fwd() -> None:
        with torch.no_grad(), autocast(device, amp):
            model(x)

    return fwd


class CandidateScorer:
    """The search stage's own scorer (:class:`engine.recipes.search.MergedScorer`) on a fresh supernet.

    ``score(cfg)`` merges the candidate into the plain model built once and counts correct
    predictions over the validation batches; ``evaluate(model)`` runs the same prediction loop
    on any model (the untouched base model is the peer).
    """

    def __init__(self, base: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], amp: bool = False):
        from engine.distributed import DistInfo
        from engine.recipes.search import MergedScorer

        device = batches[0][0].device
        self.supernet = supernet(base).to(device).eval()
        self.scorer = MergedScorer(self.supernet, batches, DistInfo(device=device), precision="bf16" if amp else "fp32")
        self.labels = torch.cat([y for _, y in self.scorer.batches])

    def evaluate(self, model: nn.Module) -> int:
        return int((self.scorer.predict(model.eval()) == self.labels).sum())

    def score(self, config) -> int:
        return int((self.scorer.predictions(config) == self.labels).sum())
