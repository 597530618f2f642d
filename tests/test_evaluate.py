"""evaluate.py on out-of-domain image folders (ImageNet-V2/-Sketch/-A/-R style): class folders matched
to the model's outputs by name or index, scoring restricted to a folder's classes, and clear errors.

The checkpoint's head has zero weights and the bias [5, 4, 3, 2, 1, 0], so every image gets the same
logits and the expected accuracies follow from the labels alone."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.data import DataConfig, DataError, load_class_names, run_class_names
from engine.evaluate import main
from engine.models import build_model
from runcfg import tiny_config
from test_data import write_image

KW = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
NAMES = [f"n0{i}" for i in range(6)]  # the run's classes, output i = NAMES[i]


@pytest.fixture
def run(tmp_path):
    """A run config on an image folder of six (empty) classes, and a merged checkpoint for it."""
    for name in NAMES:
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path / "out", data={"kind": "imagefolder", "root": str(tmp_path / "data"),
                                                                       "num_classes": 6})))
    model = build_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=KW), 6)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([5.0, 4, 3, 2, 1, 0]))
    ckpt = tmp_path / "merged.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    return ["--config", str(cfg), "--checkpoint", str(ckpt)]


def make_folder(root, counts: dict[str, int]):
    for cls, n in counts.items():
        for i in range(n):
            write_image(root / cls / "sub" / f"{i}.png", seed=i)  # nested, as ImageNet-Sketch's are not but could be
    return str(root)


def results(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_named_folders_compete_only_among_their_classes(run, tmp_path, capsys):
    """A folder of outputs 2 (three images) and 4 (one): among those two, output 2 always wins, so 75%;
    with every output competing, output 0 always wins (0%) and the top five hold both (100%)."""
    folder = make_folder(tmp_path / "ood", {"n02": 3, "n04": 1})
    assert main(argv=[*run, "--folder", folder]) == 0
    (r,) = results(capsys)
    assert r["top1"] == 75.0 and "top5" not in r and r["n"] == 4
    assert (r["classes"], r["outputs"], r["restricted"], r["mapped_by"]) == (2, 6, True, "name")

    assert main(argv=[*run, "--folder", folder, "--all-classes"]) == 0
    (r,) = results(capsys)
    assert (r["top1"], r["top5"], r["restricted"]) == (0.0, 100.0, False)


def test_numbered_folders_are_output_indices_and_several_folders_each_get_a_line(run, tmp_path, capsys):
    """ImageNet-V2 names its folders 0..999: with a folder of every class nothing is restricted."""
    numbered = make_folder(tmp_path / "v2", {"2": 3, "4": 1})
    full = make_folder(tmp_path / "all", {name: 1 for name in NAMES})
    assert main(argv=[*run, "--folder", numbered, "--folder", full]) == 0
    first, second = results(capsys)
    assert (first["folder"], first["top1"], first["mapped_by"]) == (numbered, 75.0, "index")
    assert (second["folder"], second["restricted"], second["classes"]) == (full, False, 6)
    assert second["top1"] == pytest.approx(100 / 6) and second["top5"] == pytest.approx(500 / 6)


def test_class_file_maps_by_its_lines(run, tmp_path, capsys):
    """A class file (first field per line, as LOC_synset_mapping.txt) that reverses the order: n02 is
    output 3 and n04 output 1, whose bias is higher, so only n04's one image is right."""
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"{name} some words, more words\n" for name in reversed(NAMES)) + "\n")
    folder = make_folder(tmp_path / "ood", {"n02": 3, "n04": 1})
    assert main(argv=[*run, "--folder", folder, "--classes", str(classes)]) == 0
    (r,) = results(capsys)
    assert (r["top1"], r["classes"]) == (25.0, 2)


@pytest.mark.parametrize("counts, message", [
    ({"n02": 1, "cat": 1}, r"ood: class folders 'cat' are not among the run's class names; pass --classes FILE"),
    ({"2": 1, "6": 1}, r"ood: class folder '6' maps to output 6, but the model has 6 outputs"),
    ({}, r"ood: no class folders"),
])
def test_folder_errors_are_one_line(run, tmp_path, capsys, counts, message):
    (tmp_path / "ood").mkdir()
    make_folder(tmp_path / "ood", counts)
    assert main(argv=[*run, "--folder", str(tmp_path / "ood")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'ood'}"), err
    assert __import__("re").search(message, err[0]), err


def test_bad_arguments(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv=[*run, "--folder", str(tmp_path), "--split", "val"])
    assert exc.value.code == 2 and "--split and --folder exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv=[*run, "--classes", "x.txt"])
    assert "apply to --folder only" in capsys.readouterr().err
    assert main(argv=[*run, "--folder", str(tmp_path), "--classes", str(tmp_path / "nope.txt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.txt'}: class-name file not found"


def test_load_class_names(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("n01 tench, Tinca tinca\nn02\n\n")
    assert load_class_names(str(path)) == {"n01": 0, "n02": 1}
    path.write_text("a\n\nb\n")
    with pytest.raises(DataError, match=r"c.txt: line 2: empty"):
        load_class_names(str(path))
    path.write_text("a\nb\na x\n")
    with pytest.raises(DataError, match=r"c.txt: line 3: class 'a' already named on line 1"):
        load_class_names(str(path))


def test_run_class_names_from_lists(tmp_path):
    """Few-shot lists whose images sit in one folder per class name their classes; VTAB-1k's
    images/<split>/ folders and lists mixing folders within a class do not."""
    from test_data import write_list

    ann = tmp_path / "fs" / "imagenet" / "annotations"
    write_list(ann / "train_meta.list.num_shot_1.seed_0", [("n01/a.JPEG", 0), ("n02/b.JPEG", 1)])
    write_list(ann / "test_meta.list", [("n01/c.JPEG", 0), ("n03/d.JPEG", 2)])
    cfg = DataConfig(kind="fewshot", root=str(tmp_path / "fs"), dataset="imagenet", shots=1)
    assert run_class_names(cfg) == {"n01": 0, "n02": 1, "n03": 2}
    write_list(ann / "val_meta.list", [("n02/e.JPEG", 0)])  # class 0 in two folders
    assert run_class_names(cfg) is None

    task = tmp_path / "vtab" / "dtd"
    for split in ("train800", "test"):
        write_list(task / f"{split}.txt", [(f"images/{split}/0.jpg", 0), (f"images/{split}/1.jpg", 1)])
    assert run_class_names(DataConfig(kind="vtab1k", root=str(tmp_path / "vtab"), task="dtd")) is None
    assert run_class_names(DataConfig(kind="demo")) is None


def test_without_the_runs_data(run, tmp_path, capsys):
    """On a machine without the run's data (a few-shot run whose dataset folder is elsewhere): the head's
    size comes from the checkpoint, folders named by index still score, and named ones say why the
    run's class names are missing."""
    cfg = yaml.safe_load((tmp_path / "run.yaml").read_text())
    cfg["data"] = {"kind": "fewshot", "root": str(tmp_path / "data"), "dataset": "imagenet"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(argv=[*run, "--folder", make_folder(tmp_path / "v2", {"2": 3, "4": 1})]) == 0
    (r,) = results(capsys)
    assert (r["top1"], r["outputs"], r["mapped_by"]) == (75.0, 6, "index")
    assert main(argv=[*run, "--folder", make_folder(tmp_path / "named", {"n02": 1})]) == 2
    err = capsys.readouterr().err
    assert "named: class folders 'n02' cannot be matched: the run's class names could not be read" in err
    assert "few-shot dataset directory not found" in err


def test_without_a_config_the_checkpoint_describes_the_model(tmp_path, capsys):
    """retrain.py's merged file names its model, kwargs and input (size, mean, std): create_merged_model
    rebuilds the timm model from it alone, and evaluate.py --folder needs no run config."""
    from safetensors.torch import save_file

    from supernet import AdapterError, create_merged_model
    from engine.evaluate import _from_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=KW), 5).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "merged.safetensors"
    save_file(state, path, metadata={"model": "vit_tiny_patch16_224", "kwargs": json.dumps(KW),
                                     "input": json.dumps({"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3})})
    rebuilt = create_merged_model(path)
    x = torch.randn(2, 3, 32, 32)
    assert not rebuilt.training and torch.equal(rebuilt(x), model(x))
    assert _from_checkpoint(str(path))[1:] == (32, (0.5,) * 3, (0.25,) * 3)

    assert main(argv=["--checkpoint", str(path), "--folder", make_folder(tmp_path / "v2", {"1": 2, "3": 2})]) == 0
    (r,) = results(capsys)
    assert (r["n"], r["outputs"], r["classes"], r["restricted"]) == (4, 5, 2, True)

    save_file(state, tmp_path / "bare.safetensors")
    with pytest.raises(AdapterError, match=r"bare.safetensors: its metadata names no model"):
        create_merged_model(tmp_path / "bare.safetensors")
    assert main(argv=["--checkpoint", str(tmp_path / "bare.safetensors"), "--folder", str(tmp_path / "v2")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'bare.safetensors'}: its metadata names no model")
    with pytest.raises(SystemExit):
        main(argv=["--checkpoint", str(path)])
    assert "--config is needed for a split" in capsys.readouterr().err


def test_out_writes_the_results(run, tmp_path, capsys):
    folder = make_folder(tmp_path / "ood", {"n02": 3, "n04": 1})
    out = tmp_path / "evaluate.json"
    assert main(argv=[*run, "--folder", folder, "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == results(capsys)
    with pytest.raises(SystemExit):
        main(argv=[*run, "--folder", folder, "--out", str(tmp_path / "no" / "such" / "x.json")])
    assert "its folder does not exist" in capsys.readouterr().err


def test_batch_size_and_workers_change_nothing_but_speed(run, tmp_path, capsys):
    folder = make_folder(tmp_path / "ood", {"n02": 3, "n04": 1})
    assert main(argv=[*run, "--folder", folder]) == 0
    (want,) = results(capsys)
    assert main(argv=[*run, "--folder", folder, "--batch-size", "3", "--workers", "1"]) == 0
    assert results(capsys) == [want]
    with pytest.raises(SystemExit):
        main(argv=[*run, "--folder", folder, "--workers", "-1"])
    assert "--workers at least 0" in capsys.readouterr().err
