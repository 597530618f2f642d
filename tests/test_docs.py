"""The documentation: README's length, relative links that resolve, and the generated configuration reference."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "docs" / "gen_config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code blocks are not links
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s), mailto, ... and anchors within the page
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    """The README links every page but the methods' own, which docs/methods.md links (one row each)."""
    readme = (ROOT / "README.md").read_text()
    index = (ROOT / "docs" / "methods.md").read_text()
    pages = [p.relative_to(ROOT).as_posix() for p in PAGES[1:]]
    missing = [p for p in pages if not p.startswith("docs/methods/") and p not in readme]
    missing += [p for p in pages if p.startswith("docs/methods/") and p.removeprefix("docs/") not in index]
    assert not missing, f"docs pages the README (docs/methods.md for docs/methods/) does not link: {missing}"


def test_every_registered_method_has_a_row_in_the_methods_page():
    import methods

    index = (ROOT / "docs" / "methods.md").read_text()
    assert not [n for n in methods.REGISTRY if f"| `{n}` |" not in index]


def test_configuration_reference_is_up_to_date():
    expected = _generator().render()
    actual = (ROOT / "docs" / "configuration.md").read_text()
    assert actual == expected, "docs/configuration.md is out of date: run python docs/gen_config_reference.py"


def test_configuration_reference_lists_every_key():
    import dataclasses

    from engine import config as C

    text = (ROOT / "docs" / "configuration.md").read_text()
    for f in dataclasses.fields(C.RunConfig):
        section = f.type if dataclasses.is_dataclass(f.type) else getattr(C, str(f.type), None)
        if section is not None and dataclasses.is_dataclass(section):
            for key in dataclasses.fields(section):
                assert f"`{f.name}.{key.name}`" in text, f"{f.name}.{key.name} missing"
        else:
            assert f"`{f.name}`" in text
