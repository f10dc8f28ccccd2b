"""Experiment configuration: one frozen value, with the reference's presets derived from it.

Every method's settings come from one place: `ExperimentConfig.method_configs()`, the method's
default config for the study's dataset (`camu_jax.methods.get(name, dataset=...)`; CaMU's:
`camu`, or the reference preset) with the `method_settings` entries
`(method, field, value)` applied (`--set METHOD.FIELD=VALUE`; CaMU's coefficients are flat:
`camu.rep_sample`). A tuple of values on a numeric field is a sweep (`--set
ft.learning_rate=0.01,0.03,0.1`; several give their product): every point is one config of
`method_groups()`, one row of the results. A study is written to and read from TOML
(`to_toml`, `read_study`): one top-level key per `ExperimentConfig` field and one
`[method_settings.NAME]` table per method.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path

from camu_jax.data import catalog
from camu_jax.data.splits import ForgetSpec
from camu_jax.methods.camu import CamuConfig, camu_preset
from camu_jax.steps import check_number

DATASETS = catalog.NAMES
NUM_CLASSES = {name: d.num_classes for name, d in catalog.CATALOG.items()}
SCENARIOS = ("class", "random", "proportions", "indices")
# A seed seeds jax.random.key, numpy's default_rng and the attacks' scikit-learn random_state,
# which takes 32 unsigned bits (a larger one failed only at the first evaluation, after training).
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one `python -m experiments.unlearn` invocation does.

    forget_classes: for scenario "class", a tuple of class groups: each group is forgotten
      together in its own run (`--forget-class all` gives one group per class).
    camu: None means the reference preset for (dataset, scenario) with this `batch_size`.
    """

    # digits (ships with scikit-learn), mnist, fashion_mnist, cifar10 or cifar100
    dataset: str = "digits"
    model: str = "cnn"  # cnn, resnet18 (ImageNet stem, 224x224 as the reference), resnet18_cifar
    scenario: str = "class"  # class, random, proportions or indices
    forget_classes: tuple[tuple[int, ...], ...] = ((0,),)
    forget_fraction: float = 0.1  # scenario random: the forgotten share of the training set
    forget_proportions: tuple[float, ...] = ()  # scenario proportions: per-class shares
    forget_indices: tuple[int, ...] = ()  # scenario indices: training indices to forget
    seeds: tuple[int, ...] = (0,)  # one run per seed
    original_epochs: int = 20  # epochs of the original and the retrained model (reference: 20)
    # Batch of every phase: original, retrain, relearning, and CaMU unless camu.batch_size is set.
    batch_size: int = 32
    learning_rate: float = 1e-3  # Adam lr of the original, retrained and relearning models
    weight_decay: float = 1e-4  # their coupled L2 (PyTorch Adam's weight_decay)
    camu: CamuConfig | None = None
    # Settings of the unlearning methods, (method, field, value) triples applied over each
    # method's default config (CaMU's: `camu` or the preset), later entries winning: `--set
    # ft.learning_rate=0.05`. CaMU's coefficients are flat fields (`camu.rep_sample`).
    method_settings: tuple[tuple[str, str, typing.Any], ...] = ()
    # Unlearning methods compared with original and retrain: comma separated names of
    # camu_jax.methods (camu, ft, ga, ...), or all
    methods: tuple[str, ...] = ("camu",)
    # An unlearning method whose loss or parameters turn non-finite for a run: record (its
    # cells say diverged, the study goes on) or stop (exit 2 naming the run, before any results
    # or its checkpoint are written)
    on_divergence: str = "record"
    relearn: bool = True  # the relearning check (one epoch on D_r) after unlearning
    relearn_every: int = 100  # batches between two points of the relearning curve
    # Runs trained together as one program (a population); none: every run of a phase at once
    # (waves that fit the device's free memory); 1: one run at a time (the sequential path).
    population_size: int | None = None
    # Compile every method phase's programs in a background thread from the study's start,
    # while the originals train and earlier phases run (none: on, in one process)
    compile_ahead: bool | None = None
    # Processes that fit the membership attacks of different models in parallel (default: the
    # usable cores; 1: in this process). The metric values do not depend on it.
    eval_workers: int | None = None
    workdir: str = "runs/default"  # results, splits, reports
    # Trained models, reused (default <workdir>/checkpoints; runs/checkpoints, shared by the
    # default work dirs, when --workdir is left out)
    checkpoint_dir: str | None = None
    # Seconds between two checkpoints of a model in training or unlearning (saved at the end
    # of an epoch; always after the last): a killed study resumes from the last one
    checkpoint_every: float = 60.0
    data_dir: str | None = None  # TFDS data dir (default ~/tensorflow_datasets)
    manual_dir: str | None = None  # offline source files for the TFDS builder
    progress: bool = True  # progress bars

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.dataset]

    def camu_config(self) -> CamuConfig:
        """`camu`, or the reference preset with `batch_size`: the batch is one setting of the
        whole run unless `camu` says otherwise."""
        if self.camu is not None:
            base = self.camu
        else:
            preset_scenario = "class" if self.scenario == "class" else "random"
            preset = camu_preset(self.dataset, preset_scenario)
            base = dataclasses.replace(preset, batch_size=self.batch_size)
        return apply_settings(base, sweep_points("camu", self.settings_of("camu"))[0])

    def settings_of(self, name: str) -> dict:
        """`{field: value}` of `method_settings` for method `name` (typed; later entries win)."""
        return {
            field: setting_value(method, field, value)
            for method, field, value in self.method_settings
            if method == name
        }

    def method_names(self) -> tuple[str, ...]:
        """The unlearning methods of the study, `all` expanded, in registry order."""
        from camu_jax import methods

        if "all" in self.methods:
            return methods.names()
        return tuple(self.methods)

    def method_groups(self) -> dict[str, list]:
        """`{name: [config per point]}` of every method of the study: CaMU's from `camu` or
        the preset with `--batch-size` (the reference's CaMU trains with the original's
        batch), every other method from its default config for the study's dataset
        (`camu_jax.methods.get(name, dataset=self.dataset)`: its paper's or official code's
        settings or the MNIST CNN's tuned ones, batch included, with the dataset's tuned
        defaults over them where `camu_jax.methods.defaults` has an entry: `docs/methods.md`);
        each with its `method_settings` applied (they win over the dataset's defaults), one
        config per point of its sweeps (one config when it has none)."""
        from camu_jax import methods

        out = {}
        for name in self.method_names():
            if name == "camu":
                base = self.camu_config()
            else:
                base = methods.get(name, dataset=self.dataset)
            out[name] = [
                apply_settings(base, p) for p in sweep_points(name, self.settings_of(name))
            ]
        return out

    def method_configs(self) -> dict:
        """`{row name: config}` of every point of every method (`method_groups`): the
        method's name, or `name[field=value,...]` for the points of a sweep."""
        from camu_jax.study import point_labels

        return {
            label: config
            for group in self.method_groups().values()
            for label, config in zip(point_labels(group), group, strict=True)
        }

    def setting_values(self, name: str) -> dict:
        """Every setting of method `name` (`flat_values` of its first point), its sweeps as
        tuples: what a study file and the resolved config record."""
        from camu_jax import methods

        settings = self.settings_of(name)
        if name == "camu":
            first = self.camu_config()
        else:
            first = apply_settings(
                methods.get(name, dataset=self.dataset), sweep_points(name, settings)[0]
            )
        values = flat_values(first)
        values.update({f: v for f, v in settings.items() if is_sweep(name, f, v)})
        return values

    def forget_specs(self) -> list[tuple[tuple[int, ...] | None, ForgetSpec]]:
        """`(forgotten classes or None, spec)` for every forgetting run of one seed."""
        if self.scenario == "class":
            out = []
            for group in self.forget_classes:
                # The reference repeats a single CIFAR-100 class (`catalog.class_repeat`).
                repeat = catalog.info(self.dataset).class_repeat if len(group) == 1 else 1
                out.append((group, ForgetSpec(kind="class", classes=group, repeat=repeat)))
            return out
        if self.scenario == "random":
            return [(None, ForgetSpec(kind="random", fraction=self.forget_fraction))]
        if self.scenario == "proportions":
            return [(None, ForgetSpec(kind="proportions", proportions=self.forget_proportions))]
        return [(None, ForgetSpec(kind="indices", indices=self.forget_indices))]

    def validate(self) -> None:
        """Raises ValueError naming the first bad value (before anything is written)."""
        from camu_jax.models import MODELS

        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; allowed: {', '.join(DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; allowed: {', '.join(MODELS)}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; allowed: {', '.join(SCENARIOS)}")
        if self.scenario == "class":
            if not self.forget_classes or any(not g for g in self.forget_classes):
                raise ValueError("class removal needs at least one forget class")
            for group in self.forget_classes:
                for c in group:
                    if not 0 <= c < self.num_classes:
                        raise ValueError(
                            f"forget class {c} is outside the label range 0..{self.num_classes - 1}"
                            f" of {self.dataset}"
                        )
                if len(set(group)) != len(group):
                    twice = sorted({c for c in group if group.count(c) > 1})
                    raise ValueError(
                        f"--forget-class {','.join(map(str, group))} names class "
                        f"{','.join(map(str, twice))} more than once"
                    )
        if self.scenario == "random" and not 0.0 < self.forget_fraction < 1.0:  # also NaN
            raise ValueError(
                f"forget fraction {self.forget_fraction} must lie strictly between 0 and 1"
            )
        if self.scenario == "proportions":
            for p in self.forget_proportions:
                if not 0.0 <= p <= 1.0:  # also NaN
                    raise ValueError(f"forget proportion {p} must lie in [0, 1]")
        if self.scenario == "indices" and not self.forget_indices:
            raise ValueError("scenario 'indices' needs a non-empty --forget-indices file")
        for i in self.forget_indices:
            # np.asarray(..., int64) later would silently truncate 3.5 to 3: the wrong item.
            if not isinstance(i, numbers.Integral) or isinstance(i, bool):
                raise ValueError(f"forget indices must be integers, got {i!r}")
        if self.manual_dir is not None:
            from pathlib import Path

            if not Path(self.manual_dir).is_dir():
                raise ValueError(f"manual dir {self.manual_dir} does not exist or is not a folder")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        for seed in self.seeds:
            # Before check_number: math.isfinite overflows on an int of 400 digits.
            if isinstance(seed, int) and not isinstance(seed, bool) and seed > MAX_SEED:
                raise ValueError(f"--seeds {seed} is outside the seed range 0..{MAX_SEED}")
            check_number("seed", seed, integer=True, positive=False)
        if len(set(self.seeds)) != len(self.seeds):
            twice = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
            raise ValueError(
                f"--seeds {','.join(map(str, self.seeds))} gives seed "
                f"{','.join(map(str, twice))} more than once (each seed is one run)"
            )
        check_number("original epochs", self.original_epochs, integer=True)
        check_number("batch size", self.batch_size, integer=True)
        check_number("learning rate", self.learning_rate)
        check_number("weight decay", self.weight_decay, positive=False)
        check_number("relearn every", self.relearn_every, integer=True)
        check_number("checkpoint every", self.checkpoint_every, positive=False)
        if self.on_divergence not in ("record", "stop"):
            raise ValueError(f"on divergence must be record or stop, got {self.on_divergence!r}")
        for name in ("population_size", "eval_workers"):
            if getattr(self, name) is not None:
                check_number(name.replace("_", " "), getattr(self, name), integer=True)
        for entry in self.method_settings:
            if not isinstance(entry, tuple) or len(entry) != 3:
                raise ValueError(
                    f"method_settings entries are (method, field, value) triples, got {entry!r}"
                )
            setting_value(*entry)
        self.camu_config().validate()
        from camu_jax import methods

        if not self.methods:
            raise ValueError("at least one method is needed (--methods camu,ft,... or all)")
        for name in self.methods:
            if name != "all" and name not in methods.REGISTRY:
                raise ValueError(
                    f"unknown method {name!r}; known methods: {', '.join(methods.names())}, all"
                )
        if len(set(self.methods)) != len(self.methods):
            twice = sorted({m for m in self.methods if self.methods.count(m) > 1})
            raise ValueError(
                f"--methods {','.join(self.methods)} names {', '.join(twice)} more than once"
            )
        for config in self.method_configs().values():  # every point; labels distinct
            config.validate()


def default_model(dataset: str) -> str:
    """The reference's model for a dataset: the CNN for MNIST-like data, ResNet18 for CIFAR."""
    return catalog.CATALOG[dataset].default_model if dataset in catalog.CATALOG else "cnn"


# ------------------------------------------------------------------ method settings


def leaf_type(hint):
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


@functools.cache
def _flat_paths(cls: type) -> dict[str, tuple[tuple[str, ...], object]]:
    """`{flat name: (attribute path, type)}` of a method config's settings: the fields of a
    nested config (CaMU's `coefficients`) are named without their parent."""
    out: dict[str, tuple[tuple[str, ...], object]] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            for name, (path, inner) in _flat_paths(hint).items():
                assert name not in out, f"{cls.__name__}: two settings named {name}"
                out[name] = ((field.name, *path), inner)
        else:
            assert field.name not in out, f"{cls.__name__}: two settings named {field.name}"
            out[field.name] = ((field.name,), hint)
    return out


def _method_class(name: str) -> type:
    from camu_jax import methods

    if not isinstance(name, str) or name not in methods.REGISTRY:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(methods.names())}")
    return methods.REGISTRY[name]


def setting_fields(name: str) -> dict[str, object]:
    """`{field: type}` of the settings `--set NAME.FIELD=VALUE` may change (CaMU's coefficients
    flat: `rep_sample`, not `coefficients.rep_sample`); ValueError listing the methods for an
    unknown one."""
    return {field: hint for field, (_, hint) in _flat_paths(_method_class(name)).items()}


def setting_path(name: str, field: str) -> tuple[str, ...]:
    """The attribute path of setting `field` of method `name` (`("coefficients", "rep_sample")`
    for `camu.rep_sample`); ValueError listing the method's settings for an unknown one."""
    paths = _flat_paths(_method_class(name))
    if field not in paths:
        hint = ""
        leaf = field.rpartition(".")[2] if isinstance(field, str) else None
        if leaf in paths and leaf != field:
            hint = f" (settings are flat: write {name}.{leaf}, not {name}.{field})"
        elif field in {p[0] for p, _ in paths.values() if len(p) > 1}:
            hint = f" (settings are flat: set {name}'s {field} one by one)"
        raise ValueError(f"{name} has no setting {field!r}{hint}; its settings: {', '.join(paths)}")
    return paths[field][0]


_KINDS = {
    bool: ("a boolean (true or false)", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def _describe(hint, plural: bool = False) -> str:
    hint = leaf_type(hint)
    if typing.get_origin(hint) is tuple:
        inner = _describe(typing.get_args(hint)[0], plural=True)
        return f"lists of {inner}" if plural else f"a list of {inner}"
    one, many = _KINDS.get(hint, (f"a {hint}", f"{hint} values"))
    return many if plural else one


def _coerce(value, hint, what: str):
    """`value` (a Python or TOML value) as type `hint`; ValueError naming `what` otherwise.
    Integers are accepted for floats; lists for tuples."""
    leaf = leaf_type(hint)
    if leaf is bool:
        if isinstance(value, bool):
            return value
    elif leaf in (int, float) and isinstance(value, list | tuple):
        # A sweep: one point per value (one value is no sweep).
        points = tuple(_coerce(v, leaf, what) for v in value)
        if not points:
            raise ValueError(f"{what}: a sweep needs at least one value, got {value!r}")
        return points if len(points) > 1 else points[0]
    elif leaf is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif leaf is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    elif leaf is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(leaf) is tuple and isinstance(value, list | tuple):
        (inner, *rest) = typing.get_args(leaf)
        if rest == [Ellipsis]:
            try:
                return tuple(_coerce(v, inner, what) for v in value)
            except ValueError:
                pass
    elif leaf is typing.Any:
        return value
    raise ValueError(f"{what} takes {_describe(hint)}, got {value!r}")


def _from_text(text: str, hint, what: str):
    """`text` (a command-line value) as type `hint`; ValueError naming `what` otherwise."""
    leaf = leaf_type(hint)
    try:
        if leaf is bool:
            word = text.strip().lower()
            if word in ("true", "yes", "on", "1"):
                return True
            if word in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if leaf in (int, float):
            if "," in text:  # a sweep
                return _coerce([leaf(t) for t in text.split(",") if t.strip()], leaf, what)
            return leaf(text)
        if leaf is str:
            return text
        if typing.get_origin(leaf) is tuple:
            inner = typing.get_args(leaf)[0]
            return tuple(_from_text(t.strip(), inner, what) for t in text.split(",") if t.strip())
    except ValueError:
        pass
    kind = _describe(hint).replace("list of", "comma-separated list of")
    raise ValueError(f"{what} takes {kind}, got {text!r}")


def setting_value(name: str, field: str, value):
    """`value` typed for setting `field` of method `name`; ValueError naming an unknown method
    (listing the methods), field (listing its settings) or a value of the wrong type."""
    setting_path(name, field)
    return _coerce(value, setting_fields(name)[field], f"{name}.{field}")


def setting_from_text(name: str, field: str, text: str):
    """The command-line `text` typed for setting `field` of method `name` (the dataclass
    field's type: int, float, bool, str, comma-separated tuples); ValueError as
    `setting_value`."""
    setting_path(name, field)
    return _from_text(text, setting_fields(name)[field], f"{name}.{field}")


def is_sweep(name: str, field: str, value) -> bool:
    """Whether `value` of setting `field` of method `name` is a sweep (a tuple of values of
    a numeric field)."""
    return isinstance(value, tuple) and leaf_type(setting_fields(name)[field]) in (int, float)


def sweep_points(name: str, settings: Mapping) -> list[dict]:
    """Method `name`'s `{field: value}` settings, one dict per point of their sweeps (their
    product, in the order given; one dict when there is no sweep)."""
    axes = {f: v for f, v in settings.items() if is_sweep(name, f, v)}
    fixed = {f: v for f, v in settings.items() if f not in axes}
    return [
        {**fixed, **dict(zip(axes, point, strict=True))}
        for point in itertools.product(*axes.values())
    ]


def nested_settings(name: str, settings: Mapping) -> dict:
    """Method `name`'s flat settings `{rep_sample: v}` as nested changes of its config
    (`{"coefficients": {"rep_sample": v}}` for CaMU)."""
    nested: dict = {}
    for field, value in settings.items():
        *parents, leaf = setting_path(name, field)
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def apply_settings(config, settings: Mapping):
    """The method config `config` with `{flat field: value}` applied (`dataclasses.replace`,
    nested configs included)."""
    if not settings:
        return config
    nested = nested_settings(config.name, settings)

    def replace(obj, changes):
        return dataclasses.replace(
            obj,
            **{
                k: replace(getattr(obj, k), v) if isinstance(v, dict) else v
                for k, v in changes.items()
            },
        )

    return replace(config, nested)


def flat_values(config) -> dict:
    """`{flat field: value}` of a method config (CaMU's coefficients flat), in field order."""
    out = {}
    for field, (path, _) in _flat_paths(type(config)).items():
        value = config
        for part in path:
            value = getattr(value, part)
        out[field] = value
    return out


# ------------------------------------------------------------------ study files (TOML)

STUDY_TABLE = "method_settings"  # [method_settings.NAME] tables hold the methods' settings
# ExperimentConfig fields a study file does not hold as top-level keys: (where they go instead).
_NOT_KEYS = {
    "camu": f"CaMU's settings go in a [{STUDY_TABLE}.camu] table",
}


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() and c.isascii() or c in "_-" for c in key):
        return key
    return _toml_value(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, float):
        # repr round-trips every float exactly; TOML spells the non-finite ones as Python does.
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        out = []
        for c in value:
            if c in '"\\':
                out.append("\\" + c)
            elif ord(c) < 0x20 or ord(c) == 0x7F:
                out.append(f"\\u{ord(c):04x}")
            else:
                out.append(c)
        return '"' + "".join(out) + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def to_toml(config: ExperimentConfig) -> str:
    """The study `config` as a TOML study file, fully resolved: every field of
    `ExperimentConfig` a top-level key (a `None` field is left out: unset, derived at run
    time), then one `[method_settings.NAME]` table per method of the study holding every
    setting of `method_configs()[NAME]`, and CaMU's always. `python -m experiments.unlearn
    --config FILE` reads it back (`read_study`) to the same config; floats round-trip exactly."""
    lines = [
        "# camu-jax study: python -m experiments.unlearn --config THIS_FILE (flags override it)",
    ]
    for field in dataclasses.fields(config):
        if field.name in _NOT_KEYS or field.name == STUDY_TABLE:
            continue
        value = getattr(config, field.name)
        if value is None:
            lines.append(f"# {field.name}: unset (derived at run time)")
        else:
            lines.append(f"{field.name} = {_toml_value(value)}")
    for name in ("camu", *(n for n in config.method_names() if n != "camu")):
        lines += ["", f"[{STUDY_TABLE}.{_toml_key(name)}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in config.setting_values(name).items()]
    return "\n".join(lines) + "\n"


def read_study(path) -> tuple[dict, dict]:
    """A TOML study file as `(fields, settings)`: `fields` maps `ExperimentConfig` fields to
    typed values (`forget_classes` may be "all", `forget_indices` a file path), `settings` maps
    each `[method_settings.NAME]` table to `{field: typed value}`. Raises ValueError naming the
    file and the unknown key, or the value of a wrong type."""
    path = Path(path)
    where = f"--config {path}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: cannot be read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where} is not valid TOML: {e}") from None
    hints = typing.get_type_hints(ExperimentConfig)
    keys = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in _NOT_KEYS]
    fields: dict = {}
    settings: dict = {}
    for key, value in data.items():
        if key in _NOT_KEYS:
            raise ValueError(f"{where}: key {key!r}: {_NOT_KEYS[key]}")
        if key not in keys:
            raise ValueError(
                f"{where}: unknown key {key!r}; keys: {', '.join(keys)} "
                f"([{STUDY_TABLE}.NAME] tables)"
            )
        if key == STUDY_TABLE:
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ValueError(
                    f"{where}: {STUDY_TABLE} holds one table per method, e.g. "
                    f"[{STUDY_TABLE}.ft] with learning_rate = 0.05"
                )
            for name, table in value.items():
                for field, v in table.items():
                    try:
                        while isinstance(v, dict) and v:  # a nested table: settings are flat
                            inner, v = next(iter(v.items()))
                            field = f"{field}.{inner}"
                        typed = setting_value(name, field, v)
                    except ValueError as e:
                        raise ValueError(f"{where}: [{STUDY_TABLE}.{name}] {field}: {e}") from None
                    settings.setdefault(name, {})[field] = typed
            continue
        if key == "forget_classes" and value == "all":
            fields[key] = value
        elif key == "forget_indices" and isinstance(value, str):
            fields[key] = Path(value)  # a file of indices, read as --forget-indices reads it
        else:
            try:
                fields[key] = _coerce(value, hints[key], key)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    return fields, settings
