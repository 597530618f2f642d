"""The comparison of issue 25: every method side by side on the ViT replica (track ``vit``) and on
a real ImageNet EfficientNet-Lite0 (track ``cnn``). docs/benchmarks/compare.md.

    python -m benchmarks.compare --list | --quick | [--track vit|cnn]
"""
