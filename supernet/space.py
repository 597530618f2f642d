"""Search spaces: which layers GLoRA adapts and which choices each support tensor may take.

A space is written in YAML (or given as the same dict)::

    targets: all-linear          # all-conv, all (linear and conv), or a list of regular expressions over module names
    exclude: [head]              # never adapted (the classifier is always excluded)
    choices:
      A: [lora8, lora4, vector, scalar, none]
      B: [lora8, lora4, vector, scalar, none]
      C: [lora8, lora4, vector, none]
      D: [vector, scalar, none]
      E: [vector, scalar, none]

Validation collects every problem before raising one ``SpaceError`` so that a user fixes a
broken file in one go.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

TENSORS = ("A", "B", "C", "D", "E")

# Which kinds of choice each support tensor admits (docs/method.md §2).
ALLOWED_KINDS: dict[str, tuple[str, ...]] = {
    "A": ("lora", "vector", "scalar", "none"),
    "B": ("lora", "vector", "scalar", "none"),
    "C": ("lora", "vector", "none"),
    "D": ("vector", "scalar", "none"),
    "E": ("vector", "scalar", "none"),
}

SPACE_KEYS = ("targets", "exclude", "choices")
# The targets that name a kind of layer rather than list patterns, and the kinds each takes.
TARGET_KINDS: dict[str, tuple[str, ...]] = {"all-linear": ("linear",), "all-conv": ("conv",), "all": ("linear", "conv")}
_TARGET_WORDS = "'all-linear', 'all-conv', 'all'"
_CHOICE_RE = re.compile(r"^(lora|constant|scalar|vector|none)(.*)$")


class SpaceError(ValueError):
    """A search space, target pattern or sub-network configuration is invalid."""


@dataclass(frozen=True, order=True)
class Choice:
    """One choice for one support tensor: ``lora`` with a rank, ``vector``, ``scalar`` or ``none``."""

    kind: str
    rank: int = 0

    def __str__(self) -> str:
        return f"lora{self.rank}" if self.kind == "lora" else self.kind

    def __repr__(self) -> str:
        return f"Choice({self})"

    @property
    def is_none(self) -> bool:
        return self.kind == "none"


def allowed_text(tensor: str) -> str:
    names = []
    for kind in ALLOWED_KINDS[tensor]:
        names.append({"lora": "lora<r> (r >= 1)", "scalar": "scalar (or constant)"}.get(kind, kind))
    return ", ".join(names)


def parse_choice(value: Any, tensor: str, where: str = "") -> Choice:
    """Parse ``'lora8'``, ``'vector'``, ``'scalar'``/``'constant'`` or ``'none'`` for ``tensor``.

    ``where`` names the key in error messages (e.g. ``choices.A`` or a layer name).
    """
    if isinstance(value, Choice):
        choice = value
    else:
        text = str(value).strip() if isinstance(value, str) else None
        m = _CHOICE_RE.match(text) if text is not None else None
        choice = None
        if m:
            kind, rest = m.group(1), m.group(2)
            if kind == "lora" and re.fullmatch(r"[1-9][0-9]*", rest):
                choice = Choice("lora", int(rest))
            elif kind != "lora" and rest == "":
                choice = Choice("scalar" if kind == "constant" else kind)
        if choice is None:
            key = f"{where}: " if where else ""
            raise SpaceError(f"{key}{value!r} is not a valid choice for {tensor}; allowed: {allowed_text(tensor)}")
    if choice.kind not in ALLOWED_KINDS[tensor]:
        key = f"{where}: " if where else ""
        raise SpaceError(f"{key}{str(choice)!r} is not allowed for {tensor}; allowed: {allowed_text(tensor)}")
    return choice


@dataclass(frozen=True)
class LayerChoice:
    """The five choices (A, B, C, D, E) of one adapted layer."""

    A: Choice
    B: Choice
    C: Choice
    D: Choice
    E: Choice

    @classmethod
    def parse(cls, value: Mapping[str, Any] | "LayerChoice", where: str = "") -> "LayerChoice":
        if isinstance(value, LayerChoice):
            return value
        if not isinstance(value, Mapping):
            raise SpaceError(f"{where}: expected a mapping with keys A, B, C, D, E, got {type(value).__name__}")
        problems = []
        unknown = sorted(set(map(str, value)) - set(TENSORS))
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)}; expected A, B, C, D, E")
        missing = [t for t in TENSORS if t not in value]
        if missing:
            problems.append(f"{where}: missing key(s) {', '.join(missing)}; expected A, B, C, D, E")
        parsed = {}
        for t in TENSORS:
            if t in value:
                try:
                    parsed[t] = parse_choice(value[t], t, f"{where}.{t}" if where else t)
                except SpaceError as err:
                    problems.append(str(err))
        if problems:
            raise SpaceError("; ".join(problems))
        return cls(**parsed)

    def __getitem__(self, tensor: str) -> Choice:
        return getattr(self, tensor)

    def items(self):
        return ((t, getattr(self, t)) for t in TENSORS)

    def to_dict(self) -> dict[str, str]:
        return {t: str(c) for t, c in self.items()}

    def __str__(self) -> str:
        return " ".join(f"{t}={c}" for t, c in self.items())


@dataclass
class SearchSpace:
    """A validated search space. Build with :func:`load_space`."""

    targets: str | list[str] = "all-linear"
    exclude: list[str] = field(default_factory=list)
    choices: dict[str, tuple[Choice, ...]] = field(default_factory=dict)
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": self.targets if isinstance(self.targets, str) else list(self.targets),
            "exclude": list(self.exclude),
            "choices": {t: [str(c) for c in self.choices[t]] for t in TENSORS},
        }

    def max_rank(self, tensor: str) -> int:
        return max((c.rank for c in self.choices[tensor] if c.kind == "lora"), default=0)


def _validate_patterns(value: Any, key: str, problems: list[str], allow_all: bool) -> list[str] | str | None:
    if allow_all and isinstance(value, str) and value in TARGET_KINDS:
        return value
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        expect = f"{_TARGET_WORDS} or a list of regular expressions" if allow_all else "a list of regular expressions"
        problems.append(f"{key}: expected {expect}, got {type(value).__name__}")
        return None
    if allow_all and not value:
        problems.append(f"{key}: empty list; expected {_TARGET_WORDS} or at least one regular expression")
        return None
    out = []
    for i, pat in enumerate(value):
        if not isinstance(pat, str) or not pat:
            problems.append(f"{key}[{i}]: expected a non-empty regular expression string, got {pat!r}")
            continue
        try:
            re.compile(pat)
        except re.error as err:
            problems.append(f"{key}[{i}]: {pat!r} is not a valid regular expression ({err})")
            continue
        out.append(pat)
    return out


def _space_from_dict(data: Any, source: str) -> SearchSpace:
    if not isinstance(data, Mapping):
        raise SpaceError(f"{source}: expected a mapping with keys {', '.join(SPACE_KEYS)}, got {type(data).__name__}")
    problems: list[str] = []
    for key in data:
        if key not in SPACE_KEYS:
            problems.append(f"{key}: unknown key; allowed: {', '.join(SPACE_KEYS)}")
    targets = _validate_patterns(data.get("targets", "all-linear"), "targets", problems, allow_all=True)
    exclude = _validate_patterns(data.get("exclude", []), "exclude", problems, allow_all=False)
    raw_choices = data.get("choices")
    choices: dict[str, tuple[Choice, ...]] = {}
    if not isinstance(raw_choices, Mapping):
        problems.append(f"choices: expected a mapping with keys {', '.join(TENSORS)}, got {type(raw_choices).__name__}")
    else:
        for key in raw_choices:
            if key not in TENSORS:
                problems.append(f"choices.{key}: unknown key; allowed: {', '.join(TENSORS)}")
        for t in TENSORS:
            key = f"choices.{t}"
            values = raw_choices.get(t)
            if values is None:
                problems.append(f"{key}: missing; give a list from: {allowed_text(t)}")
                continue
            if isinstance(values, str):
                values = [values]
            if not isinstance(values, (list, tuple)) or len(values) == 0:
                problems.append(f"{key}: expected a non-empty list from: {allowed_text(t)}")
                continue
            parsed = []
            for v in values:
                try:
                    c = parse_choice(v, t, key)
                except SpaceError as err:
                    problems.append(str(err))
                    continue
                if c in parsed:
                    problems.append(f"{key}: {str(c)!r} is listed twice")
                    continue
                parsed.append(c)
            choices[t] = tuple(parsed)
    if problems:
        raise SpaceError(f"{source}: " + "; ".join(problems))
    return SearchSpace(targets=targets, exclude=list(exclude or []), choices=choices, source=source)


def load_space(space: "SearchSpace | Mapping[str, Any] | str | os.PathLike") -> SearchSpace:
    """Load and validate a space from a :class:`SearchSpace`, a dict, or a YAML file path."""
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, (str, os.PathLike)):
        path = Path(space)
        if not path.is_file():
            raise SpaceError(f"{path}: search space file not found (expected a YAML file)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", None)
            where = f" at line {line + 1}" if line is not None else ""
            raise SpaceError(f"{path}: not valid YAML{where}") from None
        return _space_from_dict(data, str(path))
    return _space_from_dict(space, "space")


def pattern_matches(pattern: str, name: str) -> bool:
    """A pattern matches a module name in full, or a dotted suffix of it (``qkv`` matches ``blocks.0.attn.qkv``)."""
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name) is not None


def any_match(patterns: Iterable[str], name: str) -> bool:
    return any(pattern_matches(p, name) for p in patterns)
