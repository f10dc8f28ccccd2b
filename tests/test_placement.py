"""The placement of a phase's members on the devices (`engine.place`), on two fake CPU devices
in a separate process: a one-member phase (every phase of a single run) has no padding members
and no batch split, on one device; larger phases fill the devices; the timed probe's choice
follows the measured member-steps per second. Checked on what the engine records, nothing
timed (issue 22: the default CPU path had trained one run as two members, 6x slower)."""

import pytest


@pytest.fixture(scope="module")
def report(run_script):
    return run_script("placement.py", timeout=900)


def _layout(record):
    return {
        k: record[k]
        for k in ("members", "member_devices", "data_devices", "wave_size", "padding_members")
    }


def test_one_member_runs_alone_on_one_device(report):
    one = {"members": 1, "member_devices": 1, "data_devices": 1, "wave_size": 1}
    for key in ("one", "one_requested_1"):
        assert _layout(report[key]) == {**one, "padding_members": 0}, key


def test_population_size_one_runs_one_at_a_time_on_one_device(report):
    r = report["five_requested_1"]
    assert _layout(r) == {
        "members": 5,
        "member_devices": 1,
        "data_devices": 1,
        "wave_size": 1,
        "padding_members": 0,
    }
    assert r["waves"] == 5


def test_members_fill_the_devices(report):
    assert _layout(report["two"])["member_devices"] == 2
    assert report["two"]["padding_members"] == 0
    three = report["three_unprobed"]  # more members than devices: one wave, one padding
    assert (three["member_devices"], three["wave_size"], three["padding_members"]) == (2, 4, 1)


def test_timed_probe_picks_the_fastest_layout(report):
    fast = report["ten_stacked_faster"]
    assert (fast["wave_size"], fast["members_per_device"], fast["padding_members"]) == (10, 5, 0)
    assert fast["probe_member_steps_per_s"] == {
        "one_device": 1.0,
        "1_per_device": 2.0,
        "5_per_device": 5.0,
    }
    slow = report["ten_stacked_slower"]
    assert (slow["wave_size"], slow["members_per_device"], slow["waves"]) == (2, 1, 5)
    assert slow["probe_member_steps_per_s"]["5_per_device"] == 1.2
    assert "one member per device" in slow["rule"]
    # one at a time (its program's memory analysis also sizes the stacked wave: no program
    # is compiled for its memory alone), then spread, stacked
    assert [tuple(c) for c in report["ten_stacked_slower_calls"]] == [
        (1, 1, True),
        (2, 2, True),
        (2, 10, True),
    ]
    assert len(report["ten_stacked_slower_mesh"]) == 2
    one = report["ten_one_device"]
    assert (one["member_devices"], one["wave_size"], one["waves"]) == (1, 1, 10)
    assert one["probe_member_steps_per_s"] == {
        "one_device": 100.0,
        "1_per_device": 66.7,
        "5_per_device": 50.0,
    }
    costly = report["ten_costly_waves"]
    assert (costly["wave_size"], costly["members_per_device"], costly["waves"]) == (10, 5, 1)
    assert "one device 8.0 s" in costly["rule"] and "5 per device 6.5 s" in costly["rule"]
    untimed = report["ten_untimed"]
    assert (untimed["wave_size"], untimed["members_per_device"]) == (10, 5)


def test_a_phase_too_short_to_repay_a_compile_runs_one_at_a_time(report):
    short = report["ten_short"]
    assert (short["member_devices"], short["wave_size"], short["waves"]) == (1, 1, 10)
    assert "not tried" in short["rule"]
    assert "compiling another layout may cost 2.3 s (1.0 s one at a time)" in short["rule"]
    # one at a time timed: nothing else compiled, not even for a memory analysis
    assert [tuple(c) for c in report["ten_short_calls"]] == [(1, 1, True)]


def test_compiling_ahead_compiles_the_layout_timed_first(report):
    ahead = report["ten_ahead"]
    assert (ahead["member_devices"], ahead["wave_size"], ahead["waves"]) == (1, 1, 10)
    assert [tuple(c) for c in report["ten_ahead_calls"]] == [(1, 1, False)]


def test_few_members_spread_only_when_it_pays_back_the_compile(report):
    short = report["two_short"]
    assert (short["member_devices"], short["wave_size"], short["waves"]) == (1, 1, 2)
    assert "compiling another layout may cost" in short["rule"]
    assert [tuple(c) for c in report["two_short_calls"]] == [(1, 1, True)]
    spread = report["two_long"]
    assert (spread["member_devices"], spread["wave_size"], spread["waves"]) == (2, 2, 1)
    assert spread["probe_member_steps_per_s"] == {"1_per_device": 166.7, "one_device": 100.0}
    assert [tuple(c) for c in report["two_long_calls"]] == [(1, 1, True), (2, 2, True)]
    slow = report["two_long_slow"]
    assert (slow["member_devices"], slow["wave_size"], slow["padding_members"]) == (1, 1, 0)


def test_steps_are_scanned_only_one_member_a_device_without_xla_convolutions(report):
    # On CPU (`engine.default_use_scan`): one call per step waits for every device at every
    # step, so one member on each of several devices runs scanned chunks where the program
    # has no XLA convolution (digits: patch-matrix products). One member on one device, a
    # stacked wave, and a program with XLA convolutions (MNIST's, one member a device) keep
    # the call per step.
    assert report["step_forms"] == {
        "8_one_device": "loop",
        "8_per_device": "scan",
        "8_stacked": "loop",
        "28_one_device": "loop",
        "28_per_device": "loop",
        "28_stacked": "loop",
    }


def test_a_phase_of_no_members_is_refused(report):
    assert "at least one member" in report["zero_error"] and "0" in report["zero_error"]


def test_single_run_study_records_unpadded_phases(report):
    # The study's mesh puts both devices on the member axis (population mode) ...
    assert report["study_mesh"] == {"member": 2, "data": 1}
    phases = report["study_phases"]
    assert set(phases) == {"original", "retrain", "camu", "relearn", "evaluation"}
    for phase, records in phases.items():
        assert records, phase  # every phase records its placement
        for r in records:
            # ... and no program has a padding member or splits a batch; a phase of one model
            # (every phase but relearning, which relearns CaMU's and the retrain's) uses one
            # device
            assert r["data_devices"] == 1 and r["padding_members"] == 0, (phase, r)
            assert r["member_devices"] <= r["members"], (phase, r)
        if phase != "relearn":
            assert all(r["members"] == 1 and r["member_devices"] == 1 for r in records), phase
