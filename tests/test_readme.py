"""The README is true: its python examples run as written, and its table is what the main job
prints."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TABLE_ANCHOR = "The main job prints"
METHODS = ("original", "retrain", "camu")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def readme_table() -> list[str]:
    """The lines of the first fenced block after the sentence that introduces the table."""
    text = README.read_text()
    assert TABLE_ANCHOR in text, f"README lost the sentence {TABLE_ANCHOR!r} before its table"
    block = re.search(r"```[a-z]*\n(.*?)```", text[text.index(TABLE_ANCHOR) :], re.S)
    return block.group(1).strip("\n").splitlines()


def printed_table(stdout: str) -> list[str]:
    """The table the main job printed: from its `forget ...` line to the first blank line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("forget "))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def comparable(lines: list[str]) -> list[list[str]]:
    """Cells of each line, without the `time s` cell of the method rows: seconds depend on the
    machine and its load; every other cell is fixed by the seed."""
    rows = [line.split() for line in lines]
    return [cells[:-1] if cells and cells[0] in METHODS else cells for cells in rows]


def test_every_python_example_is_tested():
    assert len(python_blocks()) == 2, "a new README python block needs a case below"


def test_notebook_comparison_on_own_model_runs(capsys):
    block = python_blocks()[0]
    # The promise: the comparison table on a user's own linen model in at most 15 lines.
    assert len([line for line in block.splitlines() if line.strip()]) <= 15
    exec(compile(block, "README.md python block 0", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.split() and line.split()[0] in METHODS + ("ft", "ga")]
    assert [row.split()[0] for row in table] == ["original", "retrain", "camu", "ft", "ga"]


def test_pieces_example_runs(capsys):
    exec(compile(python_blocks()[1], "README.md python block 1", "exec"), {})
    out = capsys.readouterr().out
    assert "forget_train_acc" in out and "test_acc" in out


def test_readme_table_is_what_the_main_job_prints(tmp_path):
    """Runs the documented main job and compares the README's table with its output cell by
    cell, as printed (2 decimals), except the times.

    Exact equality is sound because the job is deterministic on one platform: seeded splits,
    initialisation, batch order and counterfactual noise, and XLA:CPU programs that give the
    same bits run to run (the same table came out on 1 and on 2 cores). The README states that
    the table is from CPU, so the job runs on CPU here whatever accelerator is present. Another
    jax/jaxlib version or processor may round differently and move a metric: the README names
    the version and processor the table came from, the exact comparison runs there, and on a
    mismatch this test prints the new table to paste in.
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.unlearn", "--no-progress", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = printed_table(proc.stdout)
    jax_version, cpu = readme_platform()
    if (jax_version, cpu) == (installed_jax(), host_cpu()):
        assert comparable(readme_table()) == comparable(printed), (
            "README.md's table differs from what `python -m experiments.unlearn` prints now; "
            "replace it with:\n" + "\n".join(printed)
        )
        return
    # Another processor or jax version: XLA:CPU orders sums by the host's vector width, which
    # moves cells of this small job (README says which); its layout and range stay.
    expected, got = comparable(readme_table()), comparable(printed)
    assert got[:2] == expected[:2]  # the split sizes line and the header
    assert [row[0] for row in got[2:]] == [row[0] for row in expected[2:]]
    for row in got[2:]:
        assert len(row) == len(expected[2]) and all(0.0 <= float(c) <= 100.0 for c in row[1:])


def readme_platform() -> tuple[str, str]:
    """(jax version, processor) the README says its table came from."""
    text = README.read_text()
    found = re.search(r"came from jax (\S+) on an? (.+?) CPU", text[text.index(TABLE_ANCHOR) :])
    assert found, "README no longer says which jax and processor its table came from"
    return found.group(1), found.group(2)


def installed_jax() -> str:
    import jax

    return jax.__version__


def host_cpu() -> str:
    """The processor's name as /proc/cpuinfo gives it ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        return ""
    return names[0] if names else ""


def test_readme_names_the_test_command():
    assert "python -m pytest -q" in README.read_text()


def test_readme_lists_every_registered_method():
    """The README's methods table names exactly the registry's methods, in its order."""
    from camu_jax import methods

    text = README.read_text()
    block = text[text.index("| `--methods` name |") :].split("\n\n")[0]
    listed = re.findall(r"^\| `(\w+)` \|", block, re.M)
    assert tuple(listed) == methods.names()


def test_documented_step_signatures_match_the_code():
    """The README's signatures of the steps are the code's (issue 8, item 15: `eval_step` was
    documented as `(state, batch) -> (state, metrics)`), and every `camu_jax.<module>.<name>`
    the README names exists."""
    import importlib
    import inspect

    from camu_jax import steps
    from camu_jax.methods import camu

    text = " ".join(README.read_text().split())
    pair = re.search(r"`train_step` and `camu_step`, each `\(([^)]*)\) -> \(([^)]*)\)`", text)
    assert pair, "README no longer documents train_step/camu_step as (state, batch) -> ..."
    for fn in (steps.train_step, camu.camu_step):
        positional = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        assert positional == [s.strip() for s in pair.group(1).split(",")], fn.__name__
    names = set(re.findall(r"`(camu_jax(?:\.\w+)+)`", text))
    assert len(names) > 10
    for dotted in sorted(names):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"README names {dotted}, which does not exist"
                obj = getattr(obj, attr)
            break
