"""Generated corpora for the other files a user writes: a search-space YAML (every leaf of the
shipped large space mutated), a sub-network YAML (retrain.subnet) and a --classes file. Each
mutation validates (then the model it describes builds and runs, or the file loads), or ends the
CLI with exit status 2 and one line naming the file or key, no traceback, nothing written."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import ROOT
from engine.cli import main
from engine.config import ConfigError, load_config
from engine.evaluate import main as evaluate_main
from test_config_corpus import MUTATIONS, UNKNOWN, _forward_on_cpu, _leaves, _run, _set

DEMO = ROOT / "configs" / "demo_vit.yaml"  # the linear spaces are mutated: a ViT has the layers they target


def _space_mutations():
    base = yaml.safe_load((ROOT / "configs" / "space" / "large.yaml").read_text())
    for leaf, value in _leaves(base):
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for index, item in items:  # each element of a choice list, and the list as a whole
            for name, make in MUTATIONS.items():
                data = copy.deepcopy(base)
                new = make(item)
                if index is None:
                    _set(data, leaf, new)
                else:
                    data_list = data
                    for k in leaf:
                        data_list = data_list[k]
                    data_list[index] = new
                yield f"{'.'.join(leaf)}[{index}]={new!r}", data
        for new in ([], "lora8", None, ["lora0"], ["nonsense"]):
            data = copy.deepcopy(base)
            _set(data, leaf, new)
            yield f"{'.'.join(leaf)}={new!r}", data
        data = copy.deepcopy(base)
        _set(data, leaf[:-1] + (UNKNOWN,), 1)
        yield f"{UNKNOWN} next to {'.'.join(leaf)}", data


def _check_rejected(code: int, err: str, needles: tuple, out) -> str | None:
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 2 and len(lines) == 1 and "Traceback" not in err and all(n in lines[0] for n in needles) and not out.exists():
        return None
    return f"exit {code}: {err.strip()[:300]}"


def test_every_single_edit_of_the_shipped_space(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, space = tmp_path / "out", tmp_path / "space.yaml"
    accepted, rejected, failures, built = [], [], [], set()
    for what, data in _space_mutations():
        space.write_text(yaml.safe_dump(data))
        sets = [f"space={space}", f"output_dir={out}"]
        try:
            cfg = load_config(DEMO, sets)
        except ConfigError:
            cfg = None
        if cfg is not None:
            accepted.append(what)
            _forward_on_cpu(cfg, built)
            continue
        rejected.append(what)
        for stage in ("train", "retrain"):
            problem = _check_rejected(*_run(lambda: main(stage, ["--config", str(DEMO), *[a for s in sets for a in ("--set", s)]])),
                                      (f"{DEMO}: space: ", str(space)), out)
            if problem:
                failures.append(f"{what} [{stage}] {problem}")
    assert not failures, "\n".join(failures[:20])
    assert len(rejected) >= 100 and len(accepted) >= 5, (len(rejected), accepted)


def _demo_subnet() -> dict:
    from engine.preflight import meta_model
    from supernet import apply_glora, get_subnet, subnet_to_dict

    cfg = load_config(DEMO)
    model = meta_model(cfg.model, cfg.data.demo_classes)
    apply_glora(model, cfg.search_space)
    return subnet_to_dict(get_subnet(model))


def _subnet_mutations():
    base = _demo_subnet()
    first = next(iter(base))
    for tensor, value in base[first].items():
        for name, make in [*MUTATIONS.items(), ("not allowed", lambda v: "lora999"), ("unknown", lambda v: "zz")]:
            data = copy.deepcopy(base)
            data[first][tensor] = make(value)
            yield f"{first}.{tensor}={data[first][tensor]!r} ({name})", data
    data = copy.deepcopy(base)
    data[first][UNKNOWN] = "none"
    yield f"{UNKNOWN} in {first}", data
    data = copy.deepcopy(base)
    del data[first]
    yield f"{first} missing", data
    data = copy.deepcopy(base)
    data["blocks.99.zz"] = base[first]
    yield "unknown layer", data
    for whole in (None, [], "x", {}, [base[first]]):
        yield f"whole file {whole!r}", whole
    yield "valid", base


def test_every_single_edit_of_a_subnet_file(tmp_path):
    out, subnet = tmp_path / "out", tmp_path / "subnet.yaml"
    accepted, failures = [], []
    for what, data in _subnet_mutations():
        subnet.write_text(yaml.safe_dump(data))
        # init: scratch builds the sub-network in this config's space, so validation checks it against
        # the space (init: supernet checks it against the supernet file's, in the stage)
        sets = [f"retrain.subnet={subnet}", f"output_dir={out}", "retrain.init=scratch"]
        try:
            load_config(DEMO, sets)
            accepted.append(what)
            continue
        except ConfigError:
            pass
        problem = _check_rejected(*_run(lambda: main("retrain", ["--config", str(DEMO), *[a for s in sets for a in ("--set", s)]])),
                                  (f"{DEMO}: retrain.subnet: ", str(subnet)), out)
        if problem:
            failures.append(f"{what}: {problem}")
    assert not failures, "\n".join(failures)
    assert accepted == ["valid"]  # every edit of a complete sub-network breaks it


@pytest.mark.parametrize("content,needle", [
    (b"", "no class names"),
    (b"cat\n\ndog\n", "line 2: empty"),
    (b"cat\ndog\ncat\n", "line 3: class 'cat' already named on line 1"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
])
def test_bad_classes_file(content, needle, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_bytes(content)
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    code = evaluate_main(argv=["--config", str(DEMO), "--checkpoint", str(tmp_path / "m.safetensors"),
                               "--folder", str(tmp_path / "folder"), "--classes", str(classes)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and str(classes) in lines[0] and needle in lines[0], err
    assert "Traceback" not in err
