"""The printed tables: JAX against PyTorch, and the study's population against sequential."""

from __future__ import annotations


def _fmt(x, spec=".3g"):
    return format(x, spec) if isinstance(x, int | float) else str(x)


def _print_rows(rows: list[tuple]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _speed_rows(results: dict) -> list[tuple]:
    rows = []
    for key, r in results.get("step", {}).items():
        rows.append(
            (
                f"step.{key} [steps/s]",
                _fmt(r["jax_steps_per_s"]),
                _fmt(r["torch_steps_per_s"]),
                f"{r['speedup']:.2f}x",
            )
        )
        if "jax_teacher_steps_per_s" in r:
            rows.append(
                (
                    "  ... jax with teacher in step",
                    _fmt(r["jax_teacher_steps_per_s"]),
                    "",
                    f"{r['speedup_same_work']:.2f}x",
                )
            )
    for key, r in results.get("end_to_end", {}).items():
        rows.append(
            (
                f"end_to_end.{key} [s] incl. compile ({r['epochs']} ep)",
                _fmt(r["jax_s"]),
                _fmt(r["torch_s"]),
                f"{r['speedup']:.2f}x",
            )
        )
        rows.append(
            (
                "  ... jax excluding compile [s]",
                _fmt(r["jax_excl_compile_s"]),
                "",
                f"{r['speedup_excl_compile']:.2f}x (compile {r['jax_compile_s']:.1f}s)",
            )
        )
    for key, r in results.get("wgrad_chunking", {}).items():
        rows.append(
            (
                f"ablation: chunked wgrad {key} [steps/s]",
                _fmt(r["chunked_steps_per_s"]),
                f"plain {_fmt(r['plain_steps_per_s'])}",
                f"{r['speedup']:.2f}x (chunked vs plain)",
            )
        )
    for key, r in results.get("convs", {}).items():
        rows.append(
            (
                f"conv form {key}: xla / patch [ms]",
                _fmt(r["xla_ms"]),
                f"patch {_fmt(r['patch_ms'])}",
                f"{r['xla_over_patch']:.2f}x; rule picks {r['rule_chooses']}"
                f"{'' if r['rule_right'] else ' (the slower)'}",
            )
        )
    if "eval" in results:
        r = results["eval"]
        rows.append(
            (
                f"eval ({r['examples']} test images) [s]",
                _fmt(r["jax_s"]),
                _fmt(r["torch_s"]),
                f"{r['speedup']:.2f}x",
            )
        )
    if "memory" in results:
        r = results["memory"]
        j, t = r.get("jax", {}), r.get("torch", {})
        rows.append(
            (
                "memory peak RSS [MiB]",
                _fmt(j.get("peak_rss_mb", "err")),
                _fmt(t.get("peak_rss_mb", "err")),
                "",
            )
        )
        if "device_peak_mb" in j or "device_peak_mb" in t:
            rows.append(
                (
                    "memory peak device [MiB]",
                    _fmt(j.get("device_peak_mb", "-")),
                    _fmt(t.get("device_peak_mb", "-")),
                    "",
                )
            )
    return rows


STUDY_ROWS = (
    ("wall_s", "wall, whole process [s]"),
    ("compile_s", "compile, all phases [s]"),
    ("training_s", "training: original + retrain [s]"),
    ("unlearning_s", "unlearning: CaMU [s]"),
    ("evaluation_s", "evaluation [s]"),
    ("relearning_s", "relearning [s]"),
    ("phases_s", "sum of the phases [s]"),
)


def _study_rows(s: dict) -> list[tuple]:
    ref = s.get("pytorch_multiplied_out", {})
    seeds = ",".join(map(str, s["seeds"]))
    runs = s["counts"]["camu"]
    head = f"study: {s['dataset']}, {s['scenario']} removal, seeds {seeds}: {runs} runs"
    rows = [(head, "population", "sequential", "pop / seq", "PyTorch, multiplied out *")]
    for key, label in STUDY_ROWS:
        p, q, r = s["population"][key], s["sequential"][key], s["population_over_sequential"][key]
        rows.append(
            (
                f"  {label}",
                "-" if p is None else _fmt(p),
                "-" if q is None else _fmt(q),
                "-" if r is None else f"{r:.2f}x",
                "-" if ref.get(key) is None else _fmt(ref[key]),
            )
        )
    return rows


def print_study_note(s: dict) -> None:
    ref = s.get("pytorch_multiplied_out")
    print(
        f"\n{s['repeats']} run(s) per mode, each a cold `python -m experiments.unlearn` process "
        f"(medians); population: every run of a phase at once, sequential: --population-size 1"
    )
    if ref:
        c, p = ref["counts"], ref["per_run"]
        print(
            f"* {ref['note']}: {c['originals']} x {p['original_s']:.3g} s (original), "
            f"{c['retrains']} x {p['retrain_s']:.3g} s (retrain), {c['camu']} x {p['camu_s']:.3g} "
            f"s (CaMU), {c['evaluations']} x {p['evaluation_s']:.3g} s (evaluation)"
        )


def print_table(results: dict) -> None:
    rows = _speed_rows(results)
    if rows:
        _print_rows([("benchmark", "jax", "torch", "speedup (jax vs torch)"), *rows])
    if "study" in results:
        if rows:
            print()
        if "error" in results["study"]:
            print(f"study: failed: {results['study']['error']}")
        else:
            _print_rows(_study_rows(results["study"]))
            print_study_note(results["study"])
    if "placement" in results:
        from .placement import print_placement

        print_placement(results["placement"])
    d = results["device"]
    data = f"; data: {results['data']}" if "data" in results else ""
    print(
        f"\njax {d['jax_device']} x{d['jax_device_count']}; torch {d['torch_device']} "
        f"({d['torch_device_name']}, {d['torch_threads']} threads){data}"
    )
