"""Precision by capability: what `auto` resolves to on each kind of machine, the one-line warning, where the
resolved precision is recorded, resume across machine kinds, and the bench's capability line."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

import cnnlab.bench
import cnnlab.machine
from cnnlab.bench import dense_peaks
from cnnlab.cli import app
from cnnlab.machine import Machine, _cpuinfo, inference_precision, resolve_precision
from cnnlab.models import load_model
from cnnlab.recipes import resolve_run_config
from cnnlab.train import fit, resume
from cnnlab.train.reporter import LineReporter

ZEN4 = Machine(
    cpu_model="AMD EPYC 9R14",
    cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"}),
    cpu_capability="AVX512",
    onednn_bf16=True,
    threads=2,
)
AVX2_ONLY = Machine(
    cpu_model="AMD EPYC 7R32", cpu_flags=frozenset({"avx2"}), cpu_capability="AVX2", onednn_bf16=False, threads=2
)
# AVX-512 without its BF16 extension (Skylake, Cascade Lake): oneDNN runs bf16, but emulated.
AVX512_EMULATED = Machine(
    cpu_model="Intel Xeon Gold 6148",
    cpu_flags=frozenset({"avx2", "avx512f"}),
    cpu_capability="AVX512",
    onednn_bf16=True,
    threads=2,
)
H100 = replace(AVX2_ONLY, gpu="NVIDIA H100 80GB HBM3", gpu_bf16=True)
OLD_GPU = replace(ZEN4, gpu="Tesla T4", gpu_bf16=False)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def warnings_seen(caplog, monkeypatch):
    """The warning lines cnnlab logs (the CLI stops its logger from propagating, so attach to it directly)."""
    logger = logging.getLogger("cnnlab")
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="cnnlab")
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.mark.parametrize(
    ("machine", "device", "requested", "expected", "warns"),
    [
        (ZEN4, CPU, "auto", "bf16", False),
        (ZEN4, CPU, "bf16", "bf16", False),
        (ZEN4, CPU, "fp32", "fp32", False),
        (AVX2_ONLY, CPU, "auto", "fp32", False),
        (AVX2_ONLY, CPU, "bf16", "bf16", True),
        (AVX2_ONLY, CPU, "fp32", "fp32", False),
        (AVX512_EMULATED, CPU, "auto", "fp32", False),
        (AVX512_EMULATED, CPU, "bf16", "bf16", True),
        (AVX512_EMULATED, CPU, "fp32", "fp32", False),
        (H100, CUDA, "auto", "bf16", False),  # the GPU decides, whatever the host CPU
        (H100, CUDA, "bf16", "bf16", False),
        (H100, CUDA, "fp32", "fp32", False),
        (H100, CPU, "auto", "fp32", False),  # ... and the CPU when training on it
        (OLD_GPU, CUDA, "auto", "fp32", False),
        (OLD_GPU, CUDA, "bf16", "bf16", True),
        (OLD_GPU, CUDA, "fp32", "fp32", False),
        (OLD_GPU, CPU, "auto", "bf16", False),
    ],
)
def test_precision_resolves_by_what_the_hardware_has_natively(
    machine, device, requested, expected, warns, warnings_seen
):
    assert resolve_precision(requested, device, machine) == expected
    lines = [record.getMessage() for record in warnings_seen.records]
    assert len(lines) == (1 if warns else 0)
    if warns:
        assert "\n" not in lines[0] and "slower than fp32" in lines[0]
        assert "precision auto (the default) picks fp32" in lines[0]


@pytest.mark.parametrize(("machine", "expected"), [(ZEN4, "bf16"), (AVX2_ONLY, "fp32"), (AVX512_EMULATED, "fp32")])
def test_a_bf16_model_predicts_in_bf16_only_where_that_is_native(machine, expected, warnings_seen):
    assert inference_precision("bf16", CPU, machine) == expected
    assert inference_precision("fp32", CPU, machine) == "fp32"
    assert not warnings_seen.records


def test_cpuinfo_gives_the_model_and_flags_on_x86_and_arm(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n")
    assert _cpuinfo(x86) == ("AMD EPYC 9R14", frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"}))
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\nCPU implementer\t: 0x41\n")
    assert _cpuinfo(arm) == ("", frozenset({"fp", "asimd", "sve", "bf16"}))
    assert _cpuinfo(tmp_path / "absent") == ("", frozenset())


def test_the_capability_line_names_the_cpu_its_vector_units_bf16_and_threads():
    assert ZEN4.describe() == "AMD EPYC 9R14: avx2 avx512f avx512_bf16, torch kernels AVX512, native bf16, 2 threads"
    assert AVX2_ONLY.describe() == "AMD EPYC 7R32: avx2, torch kernels AVX2, no native bf16, 2 threads"
    assert H100.describe().endswith("; GPU NVIDIA H100 80GB HBM3 (bf16)")
    assert ZEN4.to_dict()["cpu_bf16_native"] is True and AVX2_ONLY.to_dict()["cpu_bf16_native"] is False


def test_bench_times_only_the_precisions_this_machine_would_train_in(monkeypatch):
    # What is asserted is which peaks are measured, never how fast: the timing is stubbed, since the stand-in
    # Zen 4's bf16 would run emulated for minutes on an AVX2-only machine.
    monkeypatch.setattr(cnnlab.bench, "_gflops", lambda work, flops, device, budget_s: 1.0)
    fp32 = {"fp32_matmul_gflops", "fp32_conv_gflops", "fp32_peak_gflops"}
    assert set(dense_peaks(CPU, AVX2_ONLY, budget_s=0.0)) == fp32
    assert set(dense_peaks(CPU, ZEN4, budget_s=0.0)) == fp32 | {n.replace("fp32", "bf16") for n in fp32}


def on_machine(monkeypatch, machine: Machine) -> None:
    monkeypatch.setattr(cnnlab.machine, "this_machine", lambda: machine)
    monkeypatch.setattr(sys.modules["cnnlab.train.fit"], "this_machine", lambda: machine)
    monkeypatch.setattr(sys.modules["cnnlab.run_dir"], "this_machine", lambda: machine)


def fast_digits(out, **train):
    return resolve_run_config(
        {
            "data": {"dataset": "digits", "image_size": 16},
            # device cpu: these tests stand in for CPUs of each kind, also on a machine with a GPU
            "train": {"recipe": "fast70", "batch_size": 256, "epochs": 1, "device": "cpu", **train},
            "out": str(out),
        }
    )


def test_the_resolved_precision_is_printed_and_recorded_and_resume_re_resolves_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    on_machine(monkeypatch, ZEN4)
    messages: list[str] = []
    reporter = LineReporter()
    reporter.message = messages.append
    fit(fast_digits(run), reporter=reporter)
    assert any(line.startswith("precision bf16 (auto; AMD EPYC 9R14") for line in messages)
    config_text = (run / "config.toml").read_text()
    assert (
        config_text.startswith("# precision auto ran as bf16 on AMD EPYC 9R14") and 'precision = "auto"' in config_text
    )
    assert json.loads((run / "model.json").read_text())["precision"] == "bf16"

    on_machine(monkeypatch, AVX2_ONLY)  # the checkpoint moves to a machine without native bf16
    resume(run, epochs=2, reporter=LineReporter())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["precision"] for m in history] == ["bf16", "fp32"]
    assert (run / "config.toml").read_text().startswith("# precision auto ran as fp32 on AMD EPYC 7R32")
    assert load_model(run).info.precision == "fp32"


def test_explicit_bf16_without_native_support_trains_with_one_warning_line(tmp_path, monkeypatch):
    on_machine(monkeypatch, AVX2_ONLY)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            *("train", "--recipe", "fast70", "--dataset", "digits", "--image-size", "16", "--batch-size", "256"),
            *("--epochs", "0.5", "--precision", "bf16", "--device", "cpu", "--out", str(run), "-q", "--no-report"),
        ],
    )
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "bf16 is not native on this CPU (AVX2)" in warnings[0]
    assert json.loads((run / "model.json").read_text())["precision"] == "bf16"


def test_bench_prints_the_capability_line_and_carries_it_in_json(tmp_path):
    result = CliRunner().invoke(
        app,
        ["bench", "--dataset", "digits", "--recipe", "fast70", "--epochs", "0.3", "--out", str(tmp_path), "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    machine = summary["machine"]
    assert machine["summary"] == cnnlab.machine.this_machine().describe()
    assert {"cpu_model", "cpu_flags", "cpu_capability", "cpu_bf16_native", "threads", "gpu"} <= set(machine)
    assert machine["fp32_peak_gflops"] >= machine["fp32_matmul_gflops"]
    assert f"machine: {machine['summary']}" in result.stderr
    (run,) = summary["results"]
    assert run["precision"] in ("fp32", "bf16") and run["fraction_of_peak"] > 0
