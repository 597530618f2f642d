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

from supernet import apply_glora, extract_subnet, glora_layers, merge_glora, sample_subnet, set_subnet, uniform_subnet
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

TRAIN_CONTENDERS = ("peft_lora", "supernet", "subnet_lora", "peft_glora_lora", "subnet_vector", "peft_glora_vector")


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


def target_names(base: nn.Module) -> list[str]:
    """All linear layers except the classifier: exactly what ``configs/space/large.yaml`` adapts."""
    return find_targets(base, load_space(LARGE_SPACE))


def head_names(base: nn.Module) -> list[str]:
    from supernet.model import _classifier_names

    return _classifier_names(base)


def _peft(base: nn.Module, config) -> nn.Module:
    """``peft.inject_adapter_in_model`` on a copy; train the adapters and the head, as ours does."""
    import peft

    model = peft.inject_adapter_in_model(config, copy.deepcopy(base))
    heads = head_names(base)
    for name, p in model.named_parameters():
        is_head = any(name == h or name.startswith(h + ".") for h in heads)
        p.requires_grad_(is_head or "lora_" in name)  # lora_A/lora_B, glora_A..glora_E
    return model


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


def build_train_contender(name: str, base: nn.Module, seed: int = 0) -> Contender:
    if name == "peft_lora":
        return Contender(name, peft_lora(base))
    if name == "supernet":
        model = supernet(base)
        gen = torch.Generator().manual_seed(seed)
        return Contender(name, model, before=lambda: sample_subnet(model, gen))
    if name == "subnet_lora":
        return Contender(name, subnet(base, SUBNET_LORA))
    if name == "subnet_vector":
        return Contender(name, subnet(base, SUBNET_VECTOR))
    if name == "peft_glora_lora":
        return Contender(name, peft_glora(base, "lora"))
    if name == "peft_glora_vector":
        return Contender(name, peft_glora(base, "vector"))
    raise ValueError(f"unknown training contender {name!r}; known: {', '.join(TRAIN_CONTENDERS)}")


def autocast(device: str, amp: bool):
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def train_step(c: Contender, x: torch.Tensor, y: torch.Tensor, amp: bool = False) -> Callable[[], None]:
    """One training step: forward + cross-entropy + backward + AdamW over the trainable parameters."""
    model = c.model.to(x.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    device = x.device.type

    def step() -> None:
        if c.before is not None:
            c.before()
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
    """Scores search candidates the cheap way: merge into a plain model built once, then evaluate.

    ``score(cfg)`` = ``set_subnet(cfg)`` on the supernet, copy each layer's
    ``merged_weight_bias()`` into the matching ``nn.Linear`` of the plain model, run the
    validation batches and count correct predictions.
    """

    def __init__(self, base: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], amp: bool = False):
        device = batches[0][0].device
        self.supernet = supernet(base).to(device).eval()
        self.plain = copy.deepcopy(base).to(device).eval()
        self.pairs = [(layer, self.plain.get_submodule(name)) for name, layer in glora_layers(self.supernet)]
        for _, linear in self.pairs:
            linear.requires_grad_(False)
        self.batches = batches
        self.amp = amp

    @torch.no_grad()
    def load(self, config) -> None:
        set_subnet(self.supernet, config)
        for layer, linear in self.pairs:
            W, b = layer.merged_weight_bias()
            linear.weight.copy_(W)
            if linear.bias is not None:
                if b is None:
                    linear.bias.zero_()
                else:
                    linear.bias.copy_(b)
            elif b is not None:
                raise ValueError("a merged layer has a bias but the plain model's layer has none")

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> int:
        correct = torch.zeros((), dtype=torch.long, device=self.batches[0][0].device)
        with autocast(self.batches[0][0].device.type, self.amp):
            for x, y in self.batches:
                correct += (model(x).argmax(-1) == y).sum()
        return int(correct)

    def score(self, config) -> int:
        self.load(config)
        return self.evaluate(self.plain)
