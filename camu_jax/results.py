"""The result schema, defined once: every metric key with its titles and unit, the gap keys,
the column sets of the tables, the display titles of methods, and the one table formatter.

A result record is what `camu_jax.compare` returns (a list of runs) or what
`python -m experiments.unlearn` writes to ``results.json`` (``{"runs": [...], ...}``); each run
holds ``{"methods": {name: {metric: value}}}``, a method that diverged ``{"diverged": why,
"seconds": ...}`` instead of scores. `table` prints either as plain text (the notebook and the
per-run table of the CLI) or as Markdown (the reports); `summarize` is results.json's
``summary`` block.

This module imports nothing of the library at import time (`metrics` and `evaluation` import
it), and reads method titles from the method classes (`Method.title`) when asked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Metric:
    """One result key: `title` heads report (Markdown) columns, `short` plain-text columns;
    `unit` says what the number is ("%": percent, "points": percentage points, "s": seconds,
    "ratio", "fraction"); `digits` how many decimals tables print."""

    key: str
    title: str
    short: str
    unit: str
    digits: int = 2


_METRICS = (
    # What `evaluation.score` returns, in its order (METRIC_KEYS).
    Metric("remain_train_acc", "acc D_r", "D_r acc", "%"),
    Metric("forget_train_acc", "acc D_f", "D_f acc", "%"),
    Metric("test_acc", "acc test", "test", "%"),
    Metric("test_remain_acc", "acc test remain", "test rem", "%"),
    Metric("test_forget_acc", "acc test forget", "test fgt", "%"),
    Metric("mia", "MIA (ref.)", "MIA", "%"),
    Metric("UA", "UA", "UA", "%"),
    Metric("RA", "RA", "RA", "%"),
    Metric("TA", "TA", "TA", "%"),
    Metric("mia_efficacy", "MIA-efficacy", "MIA-eff", "%"),
    Metric("loss_attack", "Loss attack", "loss att", "fraction", digits=3),
    # Added per run by `metrics.add_gaps` and the runners.
    Metric("avg_gap", "Avg. Gap", "AvgGap", "points"),
    # A model's seconds: `seconds` = `compile_seconds` + `run_seconds`, its measured share of
    # its phase (`camu_jax.runner`); RTE is Retrain's run seconds over the method's, and
    # `rte_with_compile` the same of `seconds`.
    Metric("seconds", "Time (s)", "time s", "s"),
    Metric("rte", "RTE", "RTE", "ratio"),
    Metric("compile_seconds", "Compile (s)", "compile s", "s"),
    Metric("construct_seconds", "Construct (s)", "build s", "s"),
    Metric("run_seconds", "Run (s)", "run s", "s"),
    Metric("rte_with_compile", "RTE (with compile)", "RTE+comp", "ratio"),
)
METRICS: dict[str, Metric] = {m.key: m for m in _METRICS}
# What `evaluation.score` returns, in its order: the fixed layout in which scores travel
# between processes.
METRIC_KEYS = tuple(m.key for m in _METRICS[:11])
# SalUn's Avg. Gap: the mean |difference| to Retrain over these.
GAP_KEYS = ("UA", "RA", "TA", "mia_efficacy")
# Order of the metrics in results.json's summary and results.csv; unknown numeric keys follow,
# sorted.
METRIC_ORDER = (
    *GAP_KEYS,
    "avg_gap",
    "rte",
    "seconds",
    "remain_train_acc",
    "forget_train_acc",
    "test_acc",
    "test_remain_acc",
    "test_forget_acc",
    "mia",
    "loss_attack",
    "run_seconds",
    "compile_seconds",
    "construct_seconds",
    "rte_with_compile",
)

# Column sets (metric keys) of the tables.
SALUN_COLUMNS = (*GAP_KEYS, "avg_gap", "seconds", "rte")
REFERENCE_COLUMNS = (
    "remain_train_acc",
    "forget_train_acc",
    "test_acc",
    "test_remain_acc",
    "test_forget_acc",
    "mia",
    "loss_attack",
)
PER_CLASS_COLUMNS = (*GAP_KEYS, "avg_gap", "mia")
# The notebook's table (`compare.table`): SalUn's columns and the reference's MIA.
TABLE_COLUMNS = (*GAP_KEYS, "mia", "avg_gap", "seconds", "rte")
# The table the CLI prints after each run: the reference's accuracies and both MIAs.
RUN_COLUMNS = (
    "remain_train_acc",
    "forget_train_acc",
    "test_acc",
    "test_remain_acc",
    "test_forget_acc",
    "mia",
    "mia_efficacy",
    "avg_gap",
    "seconds",
)

# The table of times the CLI prints below each run's table: compiling and running apart.
TIME_COLUMNS = ("compile_seconds", "run_seconds", "seconds", "rte", "rte_with_compile")
# Every key of a method's entry that is a time (wall clock: differs run to run).
TIME_KEYS = (*TIME_COLUMNS, "construct_seconds")

BASELINES = ("original", "retrain")
BASELINE_TITLES = {"original": "Original", "retrain": "Retrain"}
# Tables list these first (those present), then the other methods in order of appearance.
METHOD_ORDER = (*BASELINES, "camu")
MISSING = "-"
MISSING_MARKDOWN = "–"  # noqa: RUF001 (the reports' cell for "no value")


class _MethodTitles(Mapping):
    """`{name: title}` of the baselines and every registered method, read from the method
    classes' `title` when looked up (the registry imports the library; this module must not at
    import time)."""

    def _titles(self) -> dict[str, str]:
        from camu_jax.methods import REGISTRY

        return {**BASELINE_TITLES, **{name: cls.title for name, cls in REGISTRY.items()}}

    def __getitem__(self, name: str) -> str:
        return self._titles()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._titles())

    def __len__(self) -> int:
        return len(self._titles())

    def __repr__(self) -> str:
        return f"METHOD_TITLES({self._titles()!r})"


METHOD_TITLES: Mapping[str, str] = _MethodTitles()


def method_title(name: str) -> str:
    """A method's display title ("CaMU", "NegGrad+", "Retrain"; a sweep's point
    "FT[learning_rate=0.01]"); an unknown name as it is."""
    base, bracket, point = name.partition("[")
    return METHOD_TITLES.get(base, base) + bracket + point


def number(value) -> float | None:
    """A finite float, or None for null, NaN, booleans and non-numbers (nothing to average)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def runs_of(record: Sequence[Mapping] | Mapping) -> list[Mapping]:
    """The runs of a record: what `compare` returns (a list of runs) or a results.json
    (``{"runs": [...]}``)."""
    if isinstance(record, Mapping):
        if "runs" not in record:
            raise ValueError("a results record holds a 'runs' list")
        record = record["runs"]
    return list(record)


def method_order(runs: Iterable[Mapping]) -> list[str]:
    """original, retrain, camu (those present), then other methods in order of appearance."""
    seen: list[str] = []
    for run in runs:
        seen.extend(m for m in run["methods"] if m not in seen)
    return [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]


def metric_keys(runs: Iterable[Mapping]) -> list[str]:
    """The metric keys the runs hold (numbers or nulls), in METRIC_ORDER, unknown ones sorted."""
    keys = {
        k
        for run in runs
        for values in run["methods"].values()
        for k, v in values.items()
        if isinstance(v, int | float) or v is None
    }
    return [k for k in METRIC_ORDER if k in keys] + sorted(keys - set(METRIC_ORDER))


def _values(runs: Sequence[Mapping], method: str, key: str) -> list[float]:
    return [v for run in runs if (v := number(run["methods"].get(method, {}).get(key))) is not None]


def summarize(record: Sequence[Mapping] | Mapping) -> dict[str, dict[str, dict[str, float]]]:
    """The ``summary`` block: ``{method: {metric: {"mean", "std"}}}`` over runs.

    Population std (ddof=0), as the reference. Nulls, NaNs and non-numbers are skipped; a metric
    with no numeric value for a method is left out.
    """
    from camu_jax.metrics import mean_std

    runs = runs_of(record)
    keys = metric_keys(runs)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method in method_order(runs):
        per_metric: dict[str, dict[str, float]] = {}
        for key in keys:
            if values := _values(runs, method, key):
                mean, std = mean_std(values)
                per_metric[key] = {"mean": mean, "std": std}
        summary[method] = per_metric
    return summary


def cell(runs: Sequence[Mapping], method: str, key: str, *, markdown: bool = False) -> str:
    """One table cell: the mean of `key` over the runs where `method` has it (with ± population
    std when several runs, always in Markdown); "diverged" when the method diverged on every run
    that would have had it; `MISSING` when nothing is known. A mean over fewer runs because the
    method diverged on some says so: "(2 runs; 1 diverged)" in Markdown, a "*" in plain text
    (`table` explains it below the table)."""
    from camu_jax.metrics import mean_std

    values = _values(runs, method, key)
    diverged = sum("diverged" in run["methods"].get(method, {}) for run in runs)
    if not values:
        return "diverged" if diverged else (MISSING_MARKDOWN if markdown else MISSING)
    mean, std = mean_std(values)
    digits = METRICS[key].digits if key in METRICS else 2
    text = f"{mean:.{digits}f}"
    if markdown or len(runs) > 1:
        text += f" ± {std:.{digits}f}"
    if diverged and key not in TIME_KEYS:
        text += f" ({len(values)} runs; {diverged} diverged)" if markdown else "*"
    return text


def _header(key: str, markdown: bool) -> str:
    metric = METRICS.get(key)
    return key if metric is None else metric.title if markdown else metric.short


def table(
    record: Sequence[Mapping] | Mapping,
    columns: Sequence[str] = TABLE_COLUMNS,
    *,
    markdown: bool = False,
    methods: Sequence[str] | None = None,
    caption: str | None = None,
    lead: Sequence[tuple[str, str]] = (),
) -> str:
    """The one results table: a row per method (`methods`, default `method_order`), a column
    per metric key of `columns`, each cell `cell`'s.

    `record` is what `compare` returns or a results.json. Plain text (default) labels rows by
    method name, heads columns with `Metric.short`, prints `caption` above and, where a method
    diverged, a line per such method below with the first reason. `markdown=True` labels rows
    by `method_title`, heads columns with `Metric.title`, and puts `lead` ((header, value)
    pairs) before the method column.
    """
    runs = runs_of(record)
    if not runs:
        raise ValueError("table needs at least one run (what compare returns), got none")
    methods = method_order(runs) if methods is None else list(methods)
    present = [m for m in methods if any(m in run["methods"] for run in runs)]
    rows = [(m, [cell(runs, m, k, markdown=markdown) for k in columns]) for m in present]
    headers = [_header(k, markdown) for k in columns]
    if markdown:
        head = [name for name, _ in lead] + ["Method", *headers]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lead_cells = [value for _, value in lead]
        lines += ["| " + " | ".join([*lead_cells, method_title(m), *c]) + " |" for m, c in rows]
        return "\n".join(lines)
    width = max([10, *(len(m) + 1 for m in present)])
    widths = [
        max([10, len(h) + 2, *(len(c[j]) + 2 for _, c in rows)]) for j, h in enumerate(headers)
    ]

    def line(label: str, cells: Sequence[str]) -> str:
        return f"{label:<{width}}" + "".join(
            f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)
        )

    lines = [] if caption is None else [caption]
    lines += [line("method", headers), *(line(m, cells) for m, cells in rows)]
    for m in present:
        if why := [
            r["methods"][m]["diverged"] for r in runs if "diverged" in r["methods"].get(m, {})
        ]:
            times = (
                ""
                if len(runs) == 1
                else f" on {len(why)} of {len(runs)} runs (* = mean of the rest)"
            )
            lines.append(f"{m} diverged{times}: {why[0]}")
    return "\n".join(lines)
