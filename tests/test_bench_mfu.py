"""bench/mfu.py: its MFU is MaxText's formula applied to what it measured, the attention changes the speed
and not the math, and a case that runs out of device memory is a row of the report, not the end of the run."""
import json
import os

import pytest

from bench import mfu, throughput
from w2s_jax.models.presets import get_preset


def test_datasheet_peaks():
    assert mfu.datasheet_tflops("NVIDIA H200") == 989.4
    assert mfu.datasheet_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert mfu.datasheet_tflops("TPU v5 lite") == 197.0
    assert mfu.datasheet_tflops("cpu") is None


def test_reports_mfu_of_the_measured_step():
    r = mfu.main(["--size=micro-s", "--batches=2", "--seq=16", "--steps=1", "--warmup=0", "--attention=own,jax",
                  "--remat=full", "--dtype=float32", "--matmul_n=256", "--devices=2"])
    cfg = get_preset("micro-s")
    assert r["flops_per_token"] == throughput.flops_per_token(cfg, 16)
    assert r["peak_source"] == "measured matmul" and r["peak_tflops"] == r["matmul_tflops"]
    assert [(c["attention"], c["remat"]) for c in r["cases"]] == [("own", "full"), ("jax", "full")]
    for case in r["cases"]:
        assert case["tokens_per_s"] == pytest.approx(2 * 16 / case["step_s"])
        assert 0 <= case["kernel_s"] <= case["step_s"] * os.cpu_count() and case["minor_faults"] >= 0
        per_chip = case["tokens_per_s"] * r["flops_per_token"] / 2 / 1e12
        assert case["mfu"] == pytest.approx(per_chip / r["peak_tflops"])
        # float32 params, gradients and AdamW's two moments are all live in the step
        assert case["memory_bytes"] > 3 * 4 * cfg.num_params
    # the first step's loss: the same model whatever the attention
    assert r["cases"][0]["loss"] == pytest.approx(r["cases"][1]["loss"], abs=1e-5)


def test_out_of_memory_and_the_time_budget_are_rows(monkeypatch, capsys, tmp_path):
    def run_case(cfg, batch, args, devices):
        if batch > 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB")
        return {"step_s": 1.0, "samples_s": [1.0], "tokens_per_s": batch * args.seq, "compile_s": 0.0,
                "kernel_s": 0.0, "minor_faults": 0, "memory_bytes": None, "loss": 1.0}

    monkeypatch.setattr(mfu, "run_case", run_case)
    out = tmp_path / "mfu.json"
    r = mfu.main(["--size=micro-s", "--batches=2,4", "--seq=16", "--attention=own", "--remat=none",
                  "--matmul_n=64", "--devices=1", f"--out={out}"])
    assert [c.get("error") for c in r["cases"]] == [None, "out of memory"]
    assert "| out of memory" in capsys.readouterr().out
    assert json.loads(out.read_text()) == r
    # past the time budget, the cases left are rows too
    r = mfu.main(["--size=micro-s", "--batches=2,4", "--seq=16", "--attention=own", "--remat=none",
                  "--matmul_n=64", "--devices=1", "--budget_s=1e-9"])
    assert [c.get("error") for c in r["cases"]] == ["not run: past --budget_s=1e-09"] * 2
    monkeypatch.setattr(mfu, "run_case", lambda *a: 1 / 0)  # any other error is a bug, and stops the run
    with pytest.raises(ZeroDivisionError):
        mfu.main(["--size=micro-s", "--batches=2", "--seq=16", "--remat=none", "--matmul_n=64", "--devices=1"])


@pytest.mark.parametrize("flag,message", [
    ("--remat=some", "--remat: unknown"), ("--attention=flash", "--attention: unknown"), ("--batches=0", "--batches"),
    ("--batches=a", "--batches"), ("--devices=-1", "--devices"), ("--size=llama9", "--size='llama9': not a preset"),
    ("--budget_s=-1", "--budget_s=-1.0: must be at least 0")])
def test_bad_flags(flag, message, capsys):
    with pytest.raises(SystemExit):
        mfu.parse_args([flag])
    assert message in capsys.readouterr().err
