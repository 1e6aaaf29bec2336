"""Issue 18 fault suite: every bad input seen in the field gives one `inc-ipamp: error: …` line, exit 1, and
loses nothing (settings and earlier artifacts stay as they were)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from inc_ipamp.cli import main

SMALL = ["--layers", "2", "--n-calib", "2", "--n-eval", "2", "--seq-len", "32", "--reps", "3",
         "--gain-seq-len", "32", "--threads", "1"]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished small run (every artifact present), copied per test so faults never leak between tests."""
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(["run", "--out", str(out), *SMALL]) == 0
    return out


@pytest.fixture()
def work(done, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(done, w)
    return w


def _one_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("inc-ipamp: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _edit(path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _first_op(d):
    return next(iter(d["ops"].values()))


@pytest.mark.parametrize("field", ["curv", "lin", "int_uniform", "x2", "mean_loss"])
def test_nan_in_sensitivity_is_named_not_solved(work, capsys, field) -> None:
    """NaN in a shift sum once hung HiGHS for good; in x2 it silently disabled the SQNR guard."""
    def poison(d):
        if field == "mean_loss":
            d["mean_loss"] = float("nan")
            return
        st = _first_op(d)["operands"]["x"]
        if field == "x2":
            st["x2"] = float("nan")
        else:
            st[field]["int8"] = float("inf") if field == "int_uniform" else float("nan")

    _edit(work / "sensitivity.json", poison)
    t0 = time.perf_counter()
    line = _one_error(capsys, main(["solve", "--out", str(work)]), "sensitivity", field)
    assert "non-finite" in line and time.perf_counter() - t0 < 30


def test_sensitivity_holding_a_list(work, capsys) -> None:
    (work / "sensitivity.json").write_text("[1, 2, 3]")
    _one_error(capsys, main(["solve", "--out", str(work)]), "sensitivity.json", "not a sensitivity record")


def test_nan_in_gains_is_refused(work, capsys) -> None:
    _edit(work / "gains.json", lambda d: next(iter(d["groups"].values()))["gains"]["ET"].__setitem__(1, float("nan")))
    _one_error(capsys, main(["solve", "--out", str(work)]), "gains", "non-finite")


@pytest.mark.parametrize("opt", [["--reps", "0"], ["--gain-seq-len", "0"], ["--n-calib", "0"], ["--threads", "0"],
                                 ["--beta", "-1"], ["--beta", "nan"], ["--target-speedup", "0.5"]])
def test_bad_numbers_are_refused_and_not_saved(work, capsys, opt) -> None:
    before = (work / "settings.json").read_text()
    cmd = "solve" if opt[0] in ("--beta", "--target-speedup") else "measure"
    _one_error(capsys, main([cmd, "--out", str(work), *opt]), opt[0])
    assert (work / "settings.json").read_text() == before
    assert main(["solve", "--out", str(work)]) == 0  # the next plain command still works


def test_read_only_output_folder(work, tmp_path, capsys) -> None:
    if os.geteuid() == 0:
        ro = tmp_path / "file-not-folder"
        ro.write_text("x")  # root ignores permission bits: a path under a regular file is unwritable for everyone
        target = ro / "out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "out"
    _one_error(capsys, main(["solve", "--out", str(target)]), "output folder")


def test_read_only_out_for_non_root(work, capsys) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; covered by the path-under-a-file case")
    work.chmod(0o500)
    try:
        _one_error(capsys, main(["solve", "--out", str(work)]), "not writable")
    finally:
        work.chmod(0o700)


def test_binary_data_file(work, tmp_path, capsys) -> None:
    data = tmp_path / "model.bin"
    data.write_bytes(bytes(range(256)) * 64)
    rc = main(["calibrate", "--out", str(tmp_path / "o"), "--data", str(data), *SMALL])
    _one_error(capsys, rc, "not UTF-8 text")


def test_mistyped_local_model_fails_fast(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    rc = main(["calibrate", "--out", str(tmp_path / "o"), "--model", "models/smollm-typo"])
    _one_error(capsys, rc, "models/smollm-typo", "not in the Hugging Face cache")
    assert time.perf_counter() - t0 < 20
    assert capsys.readouterr().err.count("WARNING") == 0


def test_hpu_error_names_the_real_option(work, capsys) -> None:
    _one_error(capsys, main(["measure", "--out", str(work), "--device", "hpu"]), "--device table")


def test_solve_refuses_formats_it_has_no_gains_for(work, capsys) -> None:
    plan_before = (work / "plan.json").read_text()
    _one_error(capsys, main(["solve", "--out", str(work), "--formats", "fp32,fp8_e4m3"]), "fp32,int8",
               "inc-ipamp measure --formats fp32,fp8_e4m3")
    assert (work / "plan.json").read_text() == plan_before
    assert json.loads((work / "settings.json").read_text())["formats"] == ["fp32", "int8"]


def test_stale_plan_after_a_remeasure_is_refused(work, capsys) -> None:
    # what a re-measure does to gains.json: same configs, a newly timed reference prefill
    _edit(work / "gains.json", lambda d: d.__setitem__("reference_time_s", d["reference_time_s"] * 1.01))
    _one_error(capsys, main(["report", "--out", str(work)]), "plan.json was made from an older gains.json",
               "inc-ipamp solve")
    assert main(["solve", "--out", str(work)]) == 0 and main(["report", "--out", str(work)]) == 0


def test_unreachable_speedup_states_the_largest(work, capsys) -> None:
    line = _one_error(capsys, main(["solve", "--out", str(work), "--target-speedup", "100"]), "out of reach")
    assert "largest predicted speedup" in line and "x" in line.split("is")[-1]


def test_second_process_on_one_output_folder_is_refused(work, capsys) -> None:
    from inc_ipamp.runtime import OutputLock

    with OutputLock(work):  # what a running `inc-ipamp measure` holds
        _one_error(capsys, main(["measure", "--out", str(work)]), "another inc-ipamp process", str(os.getpid()))
    assert main(["solve", "--out", str(work)]) == 0  # released with the process


def test_solver_is_interruptible_and_time_limited(done) -> None:
    from inc_ipamp.records import Gains, Partition, Sensitivity
    from inc_ipamp.solver import GroupChoiceIP, build_instance

    inst = build_instance(Sensitivity.load(done / "sensitivity.json"), Partition.load(done / "partition.json"),
                          Gains.load(done / "gains.json"))
    ip = GroupChoiceIP(inst, time_limit_s=7.0)
    assert ip.opt._solver_model.HandleKeyboardInterrupt is True and ip.opt.config.time_limit == 7.0


def test_truncated_model_warns(done, capsys) -> None:
    assert main(["evaluate", "--out", str(done)]) == 0
    assert "not a working language model" in capsys.readouterr().err


def test_quick_is_the_whole_model_with_smaller_settings(tmp_path) -> None:
    """`--quick` must not truncate the model (a prefix's numbers are meaningless); explicit options still win."""
    from inc_ipamp.cli import QUICK, _settings, build_parser

    args = build_parser().parse_args(["run", "--out", str(tmp_path), "--quick", "--reps", "9"])
    _, s = _settings(args)
    assert s.layers is None and s.reps == 9
    assert all(getattr(s, k) == v for k, v in QUICK.items() if k != "reps")
