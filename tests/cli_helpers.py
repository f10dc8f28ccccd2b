"""What the tests of a command's bad-input handling share (pytest puts tests/ on the path)."""


def assert_one_line_error(proc, *needles) -> str:
    """`proc` (a finished subprocess) exited 2 with exactly one `error: ...` line on stderr, no
    traceback, holding every one of `needles`; returns the line."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]
