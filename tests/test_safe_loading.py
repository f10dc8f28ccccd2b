"""Nothing the project reads may run code (issue 15 item 1): no pickle loads outside the CIFAR
builder's restricted unpickler, no `allow_pickle=True`, no `eval`, no `yaml.load`, and
`torch.load` only with `weights_only=True`."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("camu_jax", "experiments") for p in (ROOT / folder).rglob("*.py"))
FORBIDDEN = {
    "pickle.load": re.compile(r"\bpickle\.loads?\("),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "eval": re.compile(r"(?<![\w.])eval\((?!\))"),  # model.eval() and `eval()` are fine
    "yaml.load": re.compile(r"\byaml\.(unsafe_)?load\("),
    "torch.load without weights_only=True": re.compile(
        r"\btorch\.load\((?![^)]*weights_only=True)"
    ),
    "numpy load of pickles": re.compile(r"\bnp\.load\([^)]*allow_pickle\s*=\s*True"),
}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_loader_that_can_run_code(path):
    text = path.read_text()
    found = [
        f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {what}"
        for what, pattern in FORBIDDEN.items()
        for m in pattern.finditer(text)
    ]
    assert not found, found


def test_the_only_unpickler_is_the_restricted_one():
    """camu_jax/data/builders.py reads the official CIFAR archives, which are pickles, with an
    Unpickler whose find_class allows numpy arrays and nothing else."""
    users = [p for p in SOURCES if re.search(r"\bpickle\.Unpickler\b|\bUnpickler\(", p.read_text())]
    assert [p.relative_to(ROOT).as_posix() for p in users] == ["camu_jax/data/builders.py"]
    from camu_jax.data import builders

    assert builders._SafeUnpickler.find_class is not __import__("pickle").Unpickler.find_class
