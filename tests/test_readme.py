"""The README is true: its python examples run as written, and its table is what the main job
prints."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("index", [0, 1], ids=["notebook", "own_model_and_data"])
def test_python_example_runs(index, capsys):
    exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), {})
    out = capsys.readouterr().out
    assert "forget_train_acc" in out and "test_acc" in out


def test_readme_table_is_what_the_main_job_prints(tmp_path):
    """Runs the documented main job and compares the README's table with its output cell by
    cell, as printed (2 decimals), except the times.

    Exact equality is sound because the job is deterministic on one platform: seeded splits,
    initialisation, batch order and counterfactual noise, and XLA:CPU programs that give the
    same bits run to run (the same table came out on 1 and on 2 cores). The README states that
    the table is from CPU, so the job runs on CPU here whatever accelerator is present. Another
    jax/jaxlib version may round differently and, through 20 epochs, move a metric: the README
    names the version the table came from, and on a mismatch this test prints the new table to
    paste in.
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
    assert comparable(readme_table()) == comparable(printed), (
        "README.md's table differs from what `python -m experiments.unlearn` prints now; "
        "replace it with:\n" + "\n".join(printed)
    )


def test_readme_names_the_test_command():
    assert "python -m pytest -q" in README.read_text()


def test_documented_step_signatures_match_the_code():
    """The README's signatures of the steps are the code's: parameter names and what
    `eval_step` returns (issue 8, item 15: it was documented as `(state, batch) -> (state,
    metrics)`)."""
    import inspect

    import jax
    import jax.numpy as jnp

    from camu_jax import steps
    from camu_jax.models import create_model

    text = " ".join(README.read_text().split())
    pair = re.search(r"`train_step` and `camu_step`, each `\(([^)]*)\) -> \(([^)]*)\)`", text)
    assert pair, "README no longer documents train_step/camu_step as (state, batch) -> ..."
    for fn in (steps.train_step, steps.camu_step):
        positional = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        assert positional == [s.strip() for s in pair.group(1).split(",")], fn.__name__
    ev = re.search(r"`eval_step`, `\(([^)]*)\) -> dict` of ((?:`\w+`(?:, | and )?)+)", text)
    assert ev, "README does not document eval_step as `(...) -> dict` of its keys"
    positional = [
        p.name
        for p in inspect.signature(steps.eval_step).parameters.values()
        if p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    assert positional == [s.strip() for s in ev.group(1).split(",")]
    model = create_model("cnn", num_classes=10)
    variables = steps.init_variables(model, jax.random.key(0), (28, 28, 1))
    batch = {
        "image": jnp.zeros((4, 28, 28, 1)),
        "label": jnp.zeros((4,), jnp.int32),
        "mask": jnp.ones((4,)),
    }
    out = steps.eval_step(variables, batch, model=model)
    assert isinstance(out, dict)
    assert set(out) == set(re.findall(r"`(\w+)`", ev.group(2)))
