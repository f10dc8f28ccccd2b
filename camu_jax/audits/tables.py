"""The audit's Markdown tables, from its record (`camu_jax.audits.audit`, or audit.json): one
table per metric, each with N stated and its floor and ceiling as rows beside the methods."""

from __future__ import annotations

from collections.abc import Mapping

from camu_jax.results import method_title, number


def _f(value, spec: str = ".3f") -> str:
    v = number(value)
    return "–" if v is None else format(v, spec)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _title(row: str) -> str:
    return {
        "original": "Original (ceiling)",
        "retrain": "Retrain (floor)",
    }.get(row, method_title(row))


def ulira_table(u: Mapping, rows: list[str]) -> list[str]:
    first = u["methods"][rows[0]]
    lines = [
        f"### U-LiRA: N = {u['models']} shadow models ({u['models'] // 2} pairs on "
        f"complementary halves; forget sets of {u['forget_size']:.0f} examples on average; "
        f"{u['variance']} variance)",
        "",
        f"Positives (a model's forgotten examples) and negatives (examples it never saw), "
        f"pooled over target models: {first['n_positive']} and {first['n_negative']} for the "
        "original. Chance, with its 99 % band under no signal, in the first row; Retrain's "
        "ideal is chance, the original's row is plain LiRA (the ceiling).",
        "",
    ]
    body = []
    acc_band = first.get("accuracy_band")
    auc_band = first.get("auc_band")
    body.append(
        [
            "chance (floor)",
            f"0.500 ± {_f(acc_band)}",
            "–",
            f"0.500 ± {_f(auc_band)}",
            "0.010",
            "0.001",
        ]
    )
    for row in rows:
        m = u["methods"][row]
        tpr = m.get("tpr_at_fpr") or {}
        body.append(
            [
                _title(row),
                _f(m.get("accuracy")),
                _f(m.get("best_accuracy")),
                _f(m.get("auc")),
                _f(tpr.get("0.01"), ".4f"),
                _f(tpr.get("0.001"), ".4f"),
            ]
        )
    head = ["method", "accuracy", "best accuracy", "AUC", "TPR @ 1 % FPR", "TPR @ 0.1 % FPR"]
    return lines + _table(head, body)


def klom_table(k: Mapping, rows: list[str]) -> list[str]:
    sizes = k["sizes"]
    lines = [
        f"### KLOM: N = {k['models']} unlearned models against {k['oracles']} oracles "
        f"({k['direction']}; |forget| = {sizes['forget']}, |retain| = {sizes['retain']}, "
        f"|test| = {sizes['test']})",
        "",
        "50th and 95th percentiles over examples; lower is closer to retraining. Floor: "
        "Retrain, as many other oracles against the oracles (what a perfect unlearner scores at "
        "this N); ceiling: the originals against the oracles.",
        "",
    ]
    order = ["retrain", "original", *[r for r in rows if r not in ("retrain", "original")]]
    body = []
    for row in order:
        m = k["methods"][row]
        cells = [_title(row)]
        for group in ("forget", "retain", "test"):
            cells += [_f(m[group]["p50"], ".3g"), _f(m[group]["p95"], ".3g")]
        body.append(cells)
    head = ["method"] + [f"{g} p{q}" for g in ("forget", "retain", "test") for q in (50, 95)]
    return lines + _table(head, body)


def epsilon_table(e: Mapping, rows: list[str]) -> list[str]:
    acc = e["oracle_accuracy"]
    lines = [
        f"### Epsilon score: N = {e['models']} models per side (delta {e['delta']:g}, epsilon "
        f"capped at {e['cap']:g}; buckets resolve epsilon up to ceil(ln(N - 1)) = "
        f"{e['max_bucket_epsilon']:g}), |forget| = {e['forget_size']}",
        "",
        "F: the forgetting score (1 is indistinguishable from retraining at this N); F x RA x TA "
        f"scales it by the accuracies relative to the oracles' (RA {_f(acc['retain'], '.2f')} %, "
        f"TA {_f(acc['test'], '.2f')} %). Floor: Retrain (other oracles); ceiling: the originals.",
        "",
    ]
    order = ["retrain", "original", *[r for r in rows if r not in ("retrain", "original")]]
    body = []
    for row in order:
        m = e["methods"][row]
        body.append(
            [
                _title(row),
                _f(m["forget_score"]),
                _f(m["final_score"]),
                _f(m["epsilon_median"], ".2f"),
                str(m["epsilon_at_cap"]),
                _f(m["retain_accuracy"], ".2f"),
                _f(m["test_accuracy"], ".2f"),
                _f(m["forget_accuracy"], ".2f"),
            ]
        )
    head = [
        "method",
        "F",
        "F x RA x TA",
        "median epsilon",
        "at cap",
        "RA %",
        "TA %",
        "forget acc %",
    ]
    return lines + _table(head, body)


def audit_tables(record: Mapping) -> str:
    """Every metric's table of an audit record, in Markdown."""
    rows = list(record["rows"])
    parts = []
    for key, fn in (("ulira", ulira_table), ("klom", klom_table), ("epsilon", epsilon_table)):
        if key in record:
            parts.append("\n".join(fn(record[key], rows)))
    return "\n\n".join(parts) + "\n"
