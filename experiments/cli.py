"""The command line of the main job, derived from the config dataclasses.

Every field of `ExperimentConfig` is a flag `--field-name`; the fields of a nested config (`camu`:
`CamuConfig` and its `CamuCoefficients`) are flattened into `--camu-<field-name>`. A field added to
a config is therefore a flag with no further work; its help is the comment next to the field.
Only fields whose command-line form differs from their value have an entry in `SPECIAL`
(`--forget-class all`, `--forget-indices FILE`, `--set METHOD.FIELD=VALUE`); `ALIASES` keeps older
spellings working.

Defaults are never filled in by the parser: it returns only the flags given, so an explicit flag
always wins over a preset, and a flag left out never overrides one. `--config STUDY.toml` (the
`to_toml` form, `experiments.configs.read_study`) stands below the flags: a flag given wins
over the file, the file over the defaults and presets.

Method settings: `--set ft.learning_rate=0.05` (repeatable) sets one field of a method's config
(`camu_jax.methods.get(name, dataset=DATASET)`: the dataset's defaults, which `--set` overrides;
CaMU's coefficients flat, `--set camu.rep_sample=0.4`), typed from
the dataclass field. `--set camu.X` and `--camu-X` name the same setting: giving both is an
error. The resolved config holds every setting of every method of the study (`method_settings`),
as it holds CaMU's preset (`camu`), so results.json and config.toml record the values used.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import numpy as np
from simple_parsing.docstring import get_attribute_docstring

from .configs import (
    NUM_CLASSES,
    ExperimentConfig,
    apply_settings,
    default_model,
    flat_values,
    is_sweep,
    leaf_type,
    nested_settings,
    read_study,
    setting_from_text,
    sweep_points,
)

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


# Fields whose flag is not `--field-name` or whose text is not a plain value:
# (flag, argparse keywords, help).
SPECIAL = {
    "forget_classes": (
        "--forget-class",
        {"type": _class_groups},
        "class removal: a class (0), several forgotten together (0,1), or 'all' (one run per "
        "class)",
    ),
    "forget_indices": (
        "--forget-indices",
        {"type": Path},
        "scenario indices: a .npy array or a text file of training indices (integers, 1-D)",
    ),
    "method_settings": (
        "--set",
        {"action": "append", "metavar": "METHOD.FIELD=VALUE"},
        "a setting of an unlearning method, e.g. ft.learning_rate=0.05 or scrub.epochs=5 "
        "(repeatable; CaMU's coefficients are flat: camu.rep_sample=0.4)",
    ),
}
ALIASES = {"camu.kl_lr": ("--kl-lr",), "camu.impair_lr": ("--impair-lr",)}
DEFAULT_NOTES = {
    "forget_classes": "0",
    "model": "cnn for MNIST-like data, resnet18 for CIFAR",
    "workdir": "runs/<dataset>-<forget set>-<hash of the settings that change results>",
    "camu.batch_size": "--batch-size",
    "method_settings": "each method's defaults for the dataset, docs/methods.md",
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
        hint = leaf_type(hints[field.name])
        if dataclasses.is_dataclass(hint):
            # Top-level nested configs get their name as prefix; deeper levels are flattened.
            add_config_arguments(
                parser, hint, path=f"{name}.", prefix=prefix or f"{field.name.replace('_', '-')}-"
            )
            continue
        doc = get_attribute_docstring(cls, field.name).help_string
        if name in SPECIAL:
            flag, kwargs, doc = SPECIAL[name]
            kwargs = dict(kwargs)
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
                current = leaf_type(typing.get_type_hints(type(obj))[name])()
            value = _override(current, value)
        kw[name] = value
    return dataclasses.replace(obj, **kw)


def _merge(base: dict, over: dict) -> dict:
    """`base` with `over` laid on top, nested dicts merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merge(out[key], value)
        out[key] = value
    return out


def parse_settings(texts: list[str]) -> dict[str, dict]:
    """`--set` texts -> `{method: {field: typed value}}` (later ones win); raises ValueError
    naming the text, with the valid methods, fields or the expected type."""
    from camu_jax import methods

    out: dict[str, dict] = {}
    for text in texts:
        name_field, eq, value = text.partition("=")
        name, dot, field = name_field.strip().partition(".")
        if not (eq and dot and name and field):
            raise ValueError(
                f"--set {text}: expected METHOD.FIELD=VALUE (e.g. ft.learning_rate=0.05); "
                f"methods: {', '.join(methods.names())}"
            )
        try:
            out.setdefault(name, {})[field.strip()] = setting_from_text(name, field.strip(), value)
        except ValueError as e:
            raise ValueError(f"--set {text}: {e}") from None
    return out


def _camu_overrides(settings: dict) -> dict:
    """CaMU's flat settings as nested changes of a CamuConfig, the form the `--camu-*` flags
    take."""
    return nested_settings("camu", settings)


def _sweeps(name: str, settings: dict) -> dict:
    """Method `name`'s sweeps, taken out of `settings`."""
    own = settings.get(name, {})
    out = {k: v for k, v in own.items() if is_sweep(name, k, v)}
    for k in out:
        del own[k]
    return out


def _flat(nested: dict) -> dict:
    """`{leaf name: value}` of nested changes (CaMU's setting names are unique leaves)."""
    out = {}
    for key, value in nested.items():
        out.update(_flat(value) if isinstance(value, dict) else {key: value})
    return out


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The validated config of the given flags (over the `--config` study file, if any);
    raises ValueError naming any bad value."""
    from camu_jax import methods

    given = _given(args)
    settings = parse_settings(given.pop("method_settings", []))
    # CaMU's sweeps stay settings (the config's `camu` holds one value per field).
    camu_sweeps = _sweeps("camu", settings)
    # `--set camu.X` is `--camu-X`: both given is a contradiction, not a precedence question.
    camu = _camu_overrides(settings.pop("camu", {}))
    for field in sorted(_flat(camu).keys() & _flat(given.get("camu", {})).keys()):
        raise ValueError(
            f"--set camu.{field} and --camu-{field.replace('_', '-')} both set CaMU's {field}; "
            "give one"
        )
    if camu:
        given = _merge(given, {"camu": camu})
    from_command_line = set(settings)
    study_file = getattr(args, "study_file", None)
    if study_file is not None:
        file_fields, file_settings = read_study(study_file)
        camu_sweeps = {**_sweeps("camu", file_settings), **camu_sweeps}
        if camu := _camu_overrides(file_settings.pop("camu", {})):
            file_fields["camu"] = camu
        given = _merge(file_fields, given)
        settings = _merge(file_settings, settings)
    nested = {k: given.pop(k) for k in [k for k, v in given.items() if isinstance(v, dict)]}
    dataset = given.get("dataset", ExperimentConfig.dataset)
    given.setdefault("model", default_model(dataset))
    if given.get("forget_classes") == "all":
        if dataset not in NUM_CLASSES:
            raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(NUM_CLASSES)}")
        given["forget_classes"] = tuple((c,) for c in range(NUM_CLASSES[dataset]))
    if given.get("forget_indices") is not None and isinstance(given["forget_indices"], Path):
        given["forget_indices"] = load_indices(given["forget_indices"])
    config = ExperimentConfig(**given)
    config.validate()  # Dataset and scenario first: the CaMU preset depends on them.
    # The CaMU settings actually used are part of the value (and so of results.json).
    config = _override(dataclasses.replace(config, camu=config.camu_config()), nested)
    # So is every setting of every other method of the study. A study file may hold tables
    # of methods this study leaves out (a recorded study rerun with fewer --methods); a --set
    # for one is a mistake.
    names = config.method_names()
    for name in sorted(from_command_line - set(names)):
        field = next(iter(settings[name]))
        raise ValueError(
            f"--set {name}.{field}: {name} is not among the methods of this study "
            f"({', '.join(names)}); add it to --methods"
        )
    resolved = [("camu", k, v) for k, v in camu_sweeps.items()]
    for name in names:
        if name != "camu":
            given_settings = settings.get(name, {})
            first = sweep_points(name, given_settings)[0]
            base = methods.get(name, dataset=config.dataset)  # the dataset's defaults
            values = flat_values(apply_settings(base, first))
            values.update({k: v for k, v in given_settings.items() if is_sweep(name, k, v)})
            resolved += [(name, k, v) for k, v in values.items()]
    config = dataclasses.replace(config, method_settings=tuple(resolved))
    config.validate()
    if "workdir" not in given:
        # Named after the settings, so that another study never writes over this one's
        # results; the default studies share one checkpoint folder, so that the models
        # they share (originals, retrains) are trained once.
        from .outputs import DEFAULT_ROOT, default_workdir

        config = dataclasses.replace(
            config,
            workdir=default_workdir(config),
            checkpoint_dir=config.checkpoint_dir or str(DEFAULT_ROOT / "checkpoints"),
        )
    return config
