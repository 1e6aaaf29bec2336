"""Issue 2: the ``inc-ipamp`` CLI end to end on a 2-layer prefix of the real default model, and bad input."""

from __future__ import annotations

import json

import pytest

from inc_ipamp.cli import main

QUICK = ["--layers", "2", "--n-calib", "2", "--n-eval", "2", "--seq-len", "64", "--reps", "3",
         "--gain-seq-len", "64"]


def test_help_explains_stages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for stage in ("calibrate", "partition", "measure", "solve", "export", "evaluate", "run"):
        assert stage in text


def test_missing_model_path_one_clear_error(tmp_path, capsys):
    rc = main(["calibrate", "--out", str(tmp_path), "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("inc-ipamp: error: model path does not exist")
    assert "Traceback" not in err


def test_stage_without_its_inputs_says_which_file(tmp_path, capsys):
    rc = main(["solve", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "sensitivity.json" in err


def test_unknown_task_is_rejected(tmp_path, capsys):
    rc = main(["evaluate", "--out", str(tmp_path), "--tasks", "hellaswag"])
    assert rc == 1 and "unknown task 'hellaswag'" in capsys.readouterr().err


def test_bad_format_is_rejected(tmp_path, capsys):
    rc = main(["solve", "--out", str(tmp_path), "--formats", "fp32,int3"])
    assert rc == 1 and "int3" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "--out", str(out), *QUICK, "--tasks", "lee_next_sentence", "--acc-limit", "4"]) == 0
    return out


def test_run_writes_every_artifact(run_dir):
    for name in ("settings.json", "sensitivity.json", "partition.json", "gains.json", "gain_cache.jsonl",
                 "plan.json", "frontier.json", "frontier.png", "evaluation.json", "report.md"):
        assert (run_dir / name).stat().st_size > 0, name
    plan = json.loads((run_dir / "plan.json").read_text())
    sens = json.loads((run_dir / "sensitivity.json").read_text())
    assert set(plan["assignment"]) == set(sens["ops"])
    assert set(plan["assignment"].values()) <= {"fp32", "int8"}
    ev = json.loads((run_dir / "evaluation.json").read_text())
    ip = ev["plans"]["ip"]
    assert ip["measured_loss_mse"] >= 0 and ip["measured_prefill_s"] > 0
    assert {"random", "prefix", "sqnr"} <= set(ev["plans"])
    acc = ip["accuracy"]["lee_next_sentence"]
    assert acc["n"] == 4 and 0 <= acc["acc"] <= 1
    assert "lee_next_sentence" in ev["reference"]["accuracy"]
    assert plan["measured"]["measured_loss_mse"] == ip["measured_loss_mse"]
    # default loss model: curvature on, so the plan carries its predicted shift; gains span the layers
    assert plan["solver"]["predicted_shift"] is not None
    assert any(st["curv"] for op in sens["ops"].values() for st in op["operands"].values())
    gains = json.loads((run_dir / "gains.json").read_text())
    assert any("mean over" in g["source"]["ET"] for g in gains["groups"].values())


def test_no_curvature_keeps_only_the_first_order_shift(run_dir, tmp_path):
    """`calibrate --no-curvature` then `solve`: no curvature sums; the shift is the first-order mean alone."""
    import shutil

    out = tmp_path / "nc"
    shutil.copytree(run_dir, out)
    assert main(["calibrate", "--out", str(out), *QUICK, "--no-curvature"]) == 0
    sens = json.loads((out / "sensitivity.json").read_text())
    assert not any(st["curv"] for op in sens["ops"].values() for st in op["operands"].values())
    assert json.loads((out / "settings.json").read_text())["curvature"] is False
    assert sens["n_curvature"] == 0
    assert main(["solve", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    from inc_ipamp.records import Sensitivity

    rec = Sensitivity.load(out / "sensitivity.json")
    low = {op: f for op, f in plan["assignment"].items() if f != "fp32"}
    assert plan["solver"]["predicted_shift"] == pytest.approx(sum(
        rec.first_order_mean(op, o, f) for op, f in low.items() for o in rec.ops[op].operands))


def test_stage_reruns_alone_from_files(run_dir, capsys):
    """β=0 re-solved from the saved files, without the model: the reference plan."""
    assert main(["solve", "--out", str(run_dir), "--beta", "0"]) == 0
    plan = json.loads((run_dir / "plan.json").read_text())
    assert all(f == "fp32" for f in plan["assignment"].values())
    assert "plan: 0 of" in capsys.readouterr().out


def test_corrupt_artifact_is_a_clear_error(run_dir, tmp_path, capsys):
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(run_dir, work)
    (work / "gains.json").write_text('{"record": "gains", "groups": [')
    rc = main(["solve", "--out", str(work)])
    err = capsys.readouterr().err
    assert rc == 1 and "gains.json" in err and "Traceback" not in err


def test_full_run_through_the_cuda_backend_code_on_cpu(tmp_path):
    """Issue 11: `run --device cuda-on-cpu` executes the cuda backend's FP8 path (torch._scaled_mm) end to end in
    CI; the plan's formats, the gains' kernel paths and the evaluation's timing all come from that backend."""
    out = tmp_path / "cuda"
    assert main(["run", "--out", str(out), "--device", "cuda-on-cpu", *QUICK, "--threads", "1"]) == 0
    gains = json.loads((out / "gains.json").read_text())
    assert gains["formats"] == ["fp32", "fp8_e4m3"]
    assert any("_scaled_mm" in n for n in gains["notes"]), gains["notes"]
    assert any("RT" in g["gains"] for g in gains["groups"].values())  # roofline of the backend's device (h100)
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["plans"]["ip"]["measured_prefill_s"] > 0 and "speed_check" in ev["plans"]["ip"]
    assert main(["solve", "--out", str(out), "--metric", "RT"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["metric"] == "RT" and plan["predicted_gain"] >= 0
