"""Tiny models for the tests: every one builds in milliseconds and runs at 32 px."""

import timm
import torch
import torch.nn as nn


def vit(num_classes=5):
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=num_classes)


def deit(num_classes=5):
    return timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=num_classes)


def swin(num_classes=5):
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=num_classes)


def convnext(num_classes=5):
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), ls_init_value=1.0, num_classes=num_classes)


class MLP(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.fc1 = nn.Linear(3 * 32 * 32 // 16, 24)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(24, 16, bias=False)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = nn.functional.avg_pool2d(x, 4).flatten(1)
        return self.head(self.fc2(self.act(self.fc1(x))))


def mlp(num_classes=5):
    return MLP(num_classes)


BUILDERS = {"vit": vit, "deit": deit, "swin": swin, "convnext": convnext, "mlp": mlp}
