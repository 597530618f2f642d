"""Backbone loading from local files: ViT .npz (original format), .safetensors, .pth; unsafe files refused."""

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.models import ModelError, build_model

KW = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _source(num_classes=10):
    torch.manual_seed(123)
    return build_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=KW, drop_path_rate=0.0), num_classes)


def _same_backbone(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head."))


def write_vit_npz(model, path):
    """The original (JAX) ViT checkpoint layout, the inverse of timm's reader."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    D, H = model.embed_dim, model.blocks[0].attn.num_heads
    hd = D // H
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[mha + f"{n}/kernel"] = qkv_w[j * D:(j + 1) * D].T.reshape(D, H, hd)
            w[mha + f"{n}/bias"] = qkv_b[j * D:(j + 1) * D].reshape(H, hd)
        w[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(D, H, hd).transpose(1, 2, 0)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def _cfg(path):
    return ModelConfig(name="vit_tiny_patch16_224", kwargs=KW, checkpoint=str(path), drop_path_rate=0.0)


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "pth"])
def test_local_checkpoints_load_with_task_head(tmp_path, fmt):
    src = _source(num_classes=10)
    path = tmp_path / f"w.{fmt}"
    if fmt == "npz":
        write_vit_npz(src, path)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    else:
        torch.save({"model": src.state_dict()}, path)
    model = build_model(_cfg(path), num_classes=3)
    assert model.head.out_features == 3  # the classifier is reset to the task's classes
    assert _same_backbone(src, model)
    fresh = build_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=KW), num_classes=3)
    assert not _same_backbone(src, fresh)  # the test can fail: a fresh model differs


class Evil:
    def __reduce__(self):
        return (print, ("executed!",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": Evil()}, fh)
    with pytest.raises(ModelError, match="evil.pth: refused or unreadable with weights_only=True"):
        build_model(_cfg(path), 3)
    assert "executed!" not in capsys.readouterr().out


@pytest.mark.parametrize("content,needle", [(b"", "empty file"), (b"\x80\x02garbage", "refused or unreadable")])
def test_broken_pth(tmp_path, content, needle):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=needle):
        build_model(_cfg(path), 3)


def test_truncated_safetensors_and_mismatch(tmp_path):
    src = _source()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="t.safetensors"):
        build_model(_cfg(tmp_path / "t.safetensors"), 3)
    other = ModelConfig(name="vit_tiny_patch16_224", kwargs={**KW, "embed_dim": 64}, checkpoint=str(path))
    with pytest.raises(ModelError, match=r"w.safetensors: does not fit .*shape mismatch"):
        build_model(other, 3)


def test_evaluate_names_what_does_not_fit(tmp_path, capsys):
    """evaluate.py given the wrong file (an adapter file, not merged.safetensors): one error line that
    names the checkpoint and the keys that are missing and unexpected, exit status 2; a merged
    state dict of the same model evaluates."""
    import yaml

    from engine.evaluate import main
    from runcfg import tiny_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path / "out", data={"demo_test": 8})))
    model = build_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=KW), 4)
    good = tmp_path / "merged.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, good)
    wrong = tmp_path / "adapter.safetensors"
    save_file({"blocks.0.attn.qkv.glora_E": torch.zeros(96), "head.weight": torch.zeros(4, 32)}, wrong)

    assert main(argv=["--config", str(cfg), "--checkpoint", str(wrong)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapter.safetensors: does not fit VisionTransformer" in err[0], err
    assert "missing cls_token" in err[0] and "unexpected blocks.0.attn.qkv.glora_E" in err[0], err

    assert main(argv=["--config", str(cfg), "--checkpoint", str(good)]) == 0
    assert '"n": 8' in capsys.readouterr().out


def test_pretrained_weights_unreachable_is_one_clear_error(tmp_path, monkeypatch):
    """model.pretrained: true without a network (here: the hub's offline mode and an empty cache, so
    nothing is fetched): a ModelError naming the key and the way out, not the hub's traceback."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match=r"^model\.pretrained: cannot fetch the weights of 'vit_tiny_patch16_224' .*model\.checkpoint"):
        build_model(ModelConfig(name="vit_tiny_patch16_224", pretrained=True, kwargs=KW), 3)


@pytest.mark.parametrize("name, kw", [("vit_tiny_patch16_224", KW), ("convnext_atto", {}),
                                      ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 1, 1, 1)})])
def test_classifier_outputs_read_from_a_state_dict(name, kw):
    """evaluate.py sizes the head from the checkpoint (timm ViT head, ConvNeXt/Swin head.fc)."""
    import timm

    from supernet import timm_classifier_outputs

    state = timm.create_model(name, num_classes=7, **kw).state_dict()
    assert timm_classifier_outputs(name, kw, state) == 7
    assert timm_classifier_outputs(name, kw, {}) is None
