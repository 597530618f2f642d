"""Stage 2 on a tiny trained supernet: merged scoring, budget, outputs, resume, clear budget errors."""

import json

import pytest
import torch
import yaml

from conftest import needs_cxx
from engine import distributed as dist
from engine.config import ConfigError, config_from_dict
from engine.recipes.common import load_supernet
from engine.recipes.search import MergedScorer, run_search
from engine.recipes.train import run_train
from runcfg import tiny_config
from supernet import count_params, load_subnet, sample_subnet

INFO = dist.DistInfo()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "run"
    run_train(config_from_dict(tiny_config(out)), INFO, "t.yaml")
    return out


def _cfg(out, **search):
    return config_from_dict(tiny_config(out, search=search))


def test_merged_and_unmerged_scoring_agree(trained):
    from engine.data import DataConfig, build_splits

    cfg = _cfg(trained)
    _, val, n = build_splits(DataConfig(kind="demo", demo_classes=4, demo_train=48, demo_val=24, demo_test=24), "search", 32)
    model = load_supernet(cfg, n, INFO, "t.yaml")
    with torch.no_grad():
        for p in (p for name, p in model.named_parameters() if "glora_" in name):
            p.add_(torch.randn_like(p) * 0.05)  # make sub-networks really differ
    scorer = MergedScorer(model, torch.utils.data.DataLoader(val, batch_size=10), INFO)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(5):
        cfg_ = sample_subnet(model, g, activate=False)
        merged, plain = scorer.predictions(cfg_, merged=True), scorer.predictions(cfg_, merged=False)
        assert torch.equal(merged, plain)
        seen.add(tuple(merged.tolist()))
    assert len(seen) > 1


@needs_cxx
def test_compiled_scorer_follows_each_candidate(trained):
    """search.compile: one compiled plain model; every candidate copied into it in place is scored
    with its own weights (logits equal the eager model's up to rounding), and the whole search runs."""
    from engine.data import DataConfig, build_splits

    cfg = _cfg(trained)
    _, val, n = build_splits(DataConfig(kind="demo", demo_classes=4, demo_train=48, demo_val=24, demo_test=24), "search", 32)
    model = load_supernet(cfg, n, INFO, "t.yaml")
    with torch.no_grad():
        for p in (p for name, p in model.named_parameters() if "glora_" in name):
            p.add_(torch.randn_like(p) * 0.05)
    scorer = MergedScorer(model, torch.utils.data.DataLoader(val, batch_size=12), INFO, compile=True)
    x = scorer.batches[0][0]
    g = torch.Generator().manual_seed(1)
    logits = []
    with torch.no_grad():
        for _ in range(3):
            scorer.load(sample_subnet(model, g, activate=False))
            got, want = scorer.compiled(x), scorer.plain(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            logits.append(got)
    assert not torch.allclose(logits[0], logits[1])  # the compiled graph read the new weights
    out = trained.parent / "compiled"
    import shutil

    shutil.copytree(trained, out)
    assert run_search(config_from_dict(tiny_config(out, search={"compile": True})), INFO, "t.yaml") == "done"
    assert (out / "search" / "result.yaml").is_file()


def test_search_outputs_budget_and_no_duplicates(trained, tmp_path):
    budget = 9000
    assert run_search(_cfg(trained, max_params=budget, min_params=2000), INFO, "t.yaml") == "done"
    sdir = trained / "search"
    result = yaml.safe_load((sdir / "result.yaml").read_text())
    history = [json.loads(l) for l in (sdir / "history.jsonl").read_text().splitlines()]
    assert len(history) == result["evaluated"] and len(history) >= 6
    assert all(2000 <= h["params"] <= budget for h in history)
    keys = [json.dumps(h["subnet"], sort_keys=True) for h in history]
    assert len(set(keys)) == len(keys)
    assert result["accuracy"] == max(h["accuracy"] for h in history)
    assert "head is excluded" in result["params_note"]
    best = load_subnet(sdir / "result.yaml")
    from engine.data import DataConfig  # noqa: F401
    model = load_supernet(_cfg(trained), 4, INFO, "t.yaml")
    assert count_params(model, best).adapter == result["params"]
    assert (sdir / "pareto.png").stat().st_size > 1000
    assert list((sdir / "tb").glob("events.*"))


def test_search_is_deterministic(trained):
    cfg = _cfg(trained, max_params=20000, generations=3)
    run_search(cfg, INFO, "t.yaml", overwrite=True)
    full = (trained / "search" / "history.jsonl").read_text()
    run_search(cfg, INFO, "t.yaml", overwrite=True)
    assert (trained / "search" / "history.jsonl").read_text() == full  # same seed, same history
    run_search(_cfg(trained, max_params=20000, generations=3, seed=1), INFO, "t.yaml", overwrite=True)
    assert (trained / "search" / "history.jsonl").read_text() != full


def test_search_resume_after_interruption(trained, monkeypatch):
    import engine.recipes.search as st

    cfg = _cfg(trained, max_params=20000, generations=3, seed=5)
    run_search(cfg, INFO, "t.yaml", overwrite=True)
    want = (trained / "search" / "result.yaml").read_text()
    calls = {"n": 0}
    real_tell = st.EvolutionSearch.tell

    def tell_then_die(self, scores):
        real_tell(self, scores)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # dies before generation 2's state is saved

    monkeypatch.setattr(st.EvolutionSearch, "tell", tell_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, INFO, "t.yaml", overwrite=True)
    monkeypatch.setattr(st.EvolutionSearch, "tell", real_tell)
    # the finished search's result did not outlive the new one's start: retrain.py cannot pick it up
    assert not (trained / "search" / "result.yaml").exists()
    state = torch.load(trained / "search" / "state.pt", weights_only=True)
    assert state["search"]["generation"] == 1
    assert run_search(cfg, INFO, "t.yaml") == "done"  # resume: auto
    assert (trained / "search" / "result.yaml").read_text() == want


def test_a_finished_search_resumed_with_more_generations_goes_on(trained):
    """search.generations may grow between a search and its resumption: 2 generations, then 3, give the
    history and result of a 3-generation search run at once; other search keys are still refused."""
    run_search(_cfg(trained, max_params=20000, generations=3, seed=7), INFO, "t.yaml", overwrite=True)
    want = [(trained / "search" / name).read_text() for name in ("history.jsonl", "result.yaml")]
    run_search(_cfg(trained, max_params=20000, generations=2, seed=7), INFO, "t.yaml", overwrite=True)
    assert len(yaml.safe_load((trained / "search" / "result.yaml").read_text())["top_k"]) >= 1
    assert run_search(_cfg(trained, max_params=20000, generations=3, seed=7), INFO, "t.yaml") == "done"
    assert [(trained / "search" / name).read_text() for name in ("history.jsonl", "result.yaml")] == want
    # a state written before generations could change carries the digest that included them: it still
    # resumes with its own count (as before; going on longer needs a state written since)
    from engine.rundir import fingerprint

    state = torch.load(trained / "search" / "state.pt", weights_only=True)
    state["fingerprint"] = fingerprint(_cfg(trained, max_params=20000, generations=3, seed=7), "search", legacy=True)
    torch.save(state, trained / "search" / "state.pt")
    assert run_search(_cfg(trained, max_params=20000, generations=3, seed=7), INFO, "t.yaml") == "done"
    assert (trained / "search" / "history.jsonl").read_text() == want[0]
    with pytest.raises(ConfigError, match=r"different configuration \(search\.mutation_prob\)"):
        run_search(_cfg(trained, max_params=20000, generations=4, seed=7, mutation_prob=0.5), INFO, "t.yaml")


def test_a_search_from_before_search_precision_resumes_or_is_refused_clearly(trained, tmp_path):
    """search.precision and search.device came after searches existed, which scored in train.precision
    on train.device. A state written then (its config.yaml and digest lack both keys) resumes where
    search.precision equals that run's train.precision (the defaults: fp32); at another value one
    line names the key and the value that resumes it."""
    import hashlib

    from engine.rundir import fingerprint, guard_output_dir, relevant_config

    def as_before(cfg) -> dict:  # the config as written before the keys existed
        old = cfg.to_dict()
        del old["search"]["precision"], old["search"]["device"]
        return old

    def old_digest(old: dict, legacy: bool = False) -> str:  # rundir.fingerprint as computed then
        blob = json.dumps(relevant_config(old, "search", legacy), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    cfg = _cfg(trained, max_params=20000, generations=2, seed=7)
    assert run_search(cfg, INFO, "t.yaml", overwrite=True) == "done"
    sdir = trained / "search"
    (sdir / "config.yaml").write_text(yaml.safe_dump(as_before(cfg), sort_keys=False))
    state = torch.load(sdir / "state.pt", weights_only=True)
    state["fingerprint"] = old_digest(as_before(cfg))
    torch.save(state, sdir / "state.pt")
    longer = _cfg(trained, max_params=20000, generations=3, seed=7, device="cpu")
    assert run_search(longer, INFO, "t.yaml") == "done"  # resumed: another digest would be refused
    assert torch.load(sdir / "state.pt", weights_only=True)["search"]["generation"] == 3

    # a run that trained (and so searched) in bf16: rundir's checks alone, no bf16 supernet needed
    bf16 = config_from_dict(tiny_config(tmp_path / "run", train={"precision": "bf16"}))
    assert bf16.search.precision == "fp32"
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "config.yaml").write_text(yaml.safe_dump(as_before(bf16), sort_keys=False))
    with pytest.raises(ConfigError, match=r"different configuration \(search\.precision\); it predates search\.precision: "
                                          r"--set search\.precision=bf16 resumes it; choose another output_dir or pass --overwrite"):
        guard_output_dir(tmp_path / "search", bf16, "search", "t.yaml", overwrite=False)
    assert fingerprint(bf16, "search") != old_digest(as_before(bf16))
    same = config_from_dict(tiny_config(tmp_path / "run", train={"precision": "bf16"}, search={"precision": "bf16"}))
    guard_output_dir(tmp_path / "search", same, "search", "t.yaml", overwrite=False)
    assert fingerprint(same, "search") == old_digest(as_before(same))
    assert fingerprint(same, "search", legacy=True) == old_digest(as_before(same), legacy=True)  # older still: with generations


def test_budget_that_admits_nothing_fails_clearly(trained):
    # caught when the config is loaded, before the search touches output_dir
    with pytest.raises(ConfigError, match=r"search\.min_params: .* is above the largest configuration"):
        run_search(_cfg(trained, max_params=None, min_params=10**9), INFO, "t.yaml", overwrite=True)


def test_config_other_than_the_supernets_is_refused(trained, tmp_path):
    """The supernet comes from its file, so a run config changed since train.py (a space whose
    choices the file's layers kept without a word, a learning rate) described a supernet that was
    never trained: now one error names the keys, and the search writes nothing."""
    from conftest import ROOT

    cfg = config_from_dict(tiny_config(trained, space=str(ROOT / "configs" / "space" / "small.yaml")))
    with pytest.raises(ConfigError, match=r"^t\.yaml: output_dir: .*supernet\.safetensors was trained with another configuration \(space;"):
        load_supernet(cfg, 4, INFO, "t.yaml")
    before = sorted(p.name for p in trained.rglob("*"))
    with pytest.raises(ConfigError, match=r"another configuration \(space;"):
        run_search(cfg, INFO, "t.yaml", overwrite=True)
    assert sorted(p.name for p in trained.rglob("*")) == before
    # any training key counts (a learning rate changed since train.py), volatile ones do not
    with pytest.raises(ConfigError, match=r"another configuration \(train\.lr;"):
        load_supernet(config_from_dict(tiny_config(trained, train={"lr": 0.5})), 4, INFO, "t.yaml")
    load_supernet(config_from_dict(tiny_config(trained, train={"device": "cpu", "resume": "never"})), 4, INFO, "t.yaml")


def test_ranks_resuming_the_search_from_different_generations_stop(trained, monkeypatch):
    """A rank that sees another search/state.pt (a node with its own disk) would ask for other
    candidates than its peers, and the gathered scores would be paired with the wrong ones."""
    from engine.checkpoint import CheckpointError

    cfg = _cfg(trained, max_params=20000, generations=2, seed=7)
    assert run_search(cfg, INFO, "t.yaml", overwrite=True) == "done"  # state.pt at generation 2
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t + torch.tensor([0.0, 0.0], dtype=t.dtype))  # the peer starts afresh
    with pytest.raises(CheckpointError, match=r"state\.pt: the ranks do not resume the search from the same generation \(rank 0 is at 2\)"):
        run_search(cfg, INFO, "t.yaml")
