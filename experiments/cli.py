"""The command line of the main job, derived from the config dataclasses.

Every field of `ExperimentConfig` is a flag `--field-name`; the fields of a nested config (`camu`:
`CamuConfig` and its `CamuCoefficients`) are flattened into `--camu-<field-name>`. A field added to
a config is therefore a flag with no further work; its help is the comment next to the field.
Only fields whose command-line form differs from their value have an entry in `SPECIAL`
(`--forget-class all`, `--forget-indices FILE`); `ALIASES` keeps older spellings working.

Defaults are never filled in by the parser: it returns only the flags given, so an explicit flag
always wins over a preset, and a flag left out never overrides one.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import numpy as np
from simple_parsing.docstring import get_attribute_docstring

from experiments.configs import NUM_CLASSES, ExperimentConfig, default_model

_PREFIX = "config."  # namespace key prefix of config fields (other flags live beside them)


def load_indices(path: Path) -> tuple[int, ...]:
    """Training indices from a `.npy` array or a text file of integers (one per line).

    Only 1-D integer arrays are accepted: float indices would be truncated and a 2-D array
    flattened in some order, so the wrong items would be forgotten.
    """
    if path.is_dir():
        raise ValueError(f"--forget-indices {path} is a directory; expected a .npy or text file")
    if not path.is_file():
        raise ValueError(f"--forget-indices file {path} does not exist")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(
                f"--forget-indices file {path} is not a readable .npy array: {e}"
            ) from None
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"--forget-indices file {path} holds {arr.dtype} values; indices must be an "
                "integer array (e.g. np.save(path, idx.astype(np.int64)))"
            )
    else:
        try:
            arr = np.loadtxt(path, dtype=np.int64, ndmin=1)
        except ValueError as e:
            raise ValueError(f"--forget-indices file {path}: {e}") from None
    if arr.ndim != 1:
        raise ValueError(
            f"--forget-indices file {path} holds an array of shape {arr.shape}; "
            "a 1-D list of indices is needed"
        )
    return tuple(int(i) for i in arr)


def _class_groups(text: str) -> tuple[tuple[int, ...], ...] | str:
    if text.strip() == "all":
        return "all"  # one group per class, resolved once the dataset is known
    return (_csv(int)(text),)


def _csv(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got {text!r}"
            ) from None

    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


# Fields whose flag is not `--field-name` or whose text is not a plain value: (flag, parser, help).
SPECIAL = {
    "forget_classes": (
        "--forget-class",
        _class_groups,
        "class removal: a class (0), several forgotten together (0,1), or 'all' (one run per "
        "class)",
    ),
    "forget_indices": (
        "--forget-indices",
        Path,
        "scenario indices: a .npy array or a text file of training indices (integers, 1-D)",
    ),
}
ALIASES = {"camu.kl_lr": ("--kl-lr",), "camu.impair_lr": ("--impair-lr",)}
DEFAULT_NOTES = {
    "forget_classes": "0",
    "model": "cnn for MNIST-like data, resnet18 for CIFAR",
    "workdir": "runs/<dataset>-<model>-<scenario>",
    "camu.batch_size": "--batch-size",
}
PRESET_CONFIGS = ("camu",)  # nested configs whose defaults come from a preset


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _leaf_type(hint):
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _parser_for(path: str, hint) -> dict:
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in (int, float, str):
        return {"type": hint}
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str):
            return {"type": _csv(args[0])}
    # A new field of a type the command line cannot express must not silently go missing.
    raise TypeError(
        f"config field {path!r} of type {hint} has no command-line form; add it to SPECIAL"
    )


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, *, path: str = "", prefix: str = ""
) -> None:
    """Adds one flag per leaf field of the dataclass `cls` (recursively), with dest
    `config.<dotted field path>` and no default."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        name = f"{path}{field.name}"
        hint = _leaf_type(hints[field.name])
        if dataclasses.is_dataclass(hint):
            # Top-level nested configs get their name as prefix; deeper levels are flattened.
            add_config_arguments(
                parser, hint, path=f"{name}.", prefix=prefix or f"{field.name.replace('_', '-')}-"
            )
            continue
        doc = get_attribute_docstring(cls, field.name).help_string
        if name in SPECIAL:
            flag, parse, doc = SPECIAL[name]
            kwargs = {"type": parse}
        else:
            flag = f"--{prefix}{field.name.replace('_', '-')}"
            kwargs = _parser_for(name, hint)
        if name in DEFAULT_NOTES:
            default = DEFAULT_NOTES[name]
        elif path.split(".")[0] in PRESET_CONFIGS:
            default = "the preset for dataset and scenario"
        else:
            default = _show(_default(field))
        kwargs.setdefault("metavar", field.name.upper())
        parser.add_argument(
            flag,
            *ALIASES.get(name, ()),
            dest=_PREFIX + name,
            default=argparse.SUPPRESS,
            # A None default means "derived", which the field's comment explains.
            help=doc
            if default == "none" and _default(field) is None
            else f"{doc} (default: {default})",
            **kwargs,
        )


def _given(args: argparse.Namespace) -> dict:
    """The config flags given, as a nested dict `{field: value or {field: ...}}`."""
    out: dict = {}
    for key, value in vars(args).items():
        if key.startswith(_PREFIX):
            *parents, leaf = key[len(_PREFIX) :].split(".")
            node = out
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return out


def _override(obj, changes: dict):
    """`obj` with `changes` applied, nested dicts into nested dataclasses."""
    kw = {}
    for name, value in changes.items():
        if isinstance(value, dict):
            current = getattr(obj, name)
            if current is None:
                current = _leaf_type(typing.get_type_hints(type(obj))[name])()
            value = _override(current, value)
        kw[name] = value
    return dataclasses.replace(obj, **kw)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The validated config of the given flags; raises ValueError naming any bad value."""
    given = _given(args)
    nested = {k: given.pop(k) for k in [k for k, v in given.items() if isinstance(v, dict)]}
    dataset = given.get("dataset", ExperimentConfig.dataset)
    given.setdefault("model", default_model(dataset))
    scenario = given.get("scenario", ExperimentConfig.scenario)
    given.setdefault("workdir", str(Path("runs") / f"{dataset}-{given['model']}-{scenario}"))
    if given.get("forget_classes") == "all":
        if dataset not in NUM_CLASSES:
            raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(NUM_CLASSES)}")
        given["forget_classes"] = tuple((c,) for c in range(NUM_CLASSES[dataset]))
    if given.get("forget_indices") is not None:
        given["forget_indices"] = load_indices(given["forget_indices"])
    config = ExperimentConfig(**given)
    config.validate()  # Dataset and scenario first: the CaMU preset depends on them.
    # The CaMU settings actually used are part of the value (and so of results.json).
    config = _override(dataclasses.replace(config, camu=config.camu_config()), nested)
    config.validate()
    return config
