"""What this machine can compute fast, and the precision that follows from it.

bf16 pays only where the hardware multiplies bf16 natively: on CPUs with AVX-512 BF16 or AMX (and Arm's
BF16 extension), and on CUDA GPUs that support it. Elsewhere oneDNN emulates it, several times slower than
fp32 (a matmul 75-190x slower on AVX2-only kernels), so `auto` picks fp32 there.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import torch

from cnnlab.errors import CnnlabError, ConfigError

Precision = Literal["fp32", "bf16"]  # what training and inference actually run in
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512 BF16, AMX; Arm's BF16
_REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16", "asimd", "sve")
_log = logging.getLogger("cnnlab")


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cpu_flags: frozenset[str]  # those of _REPORTED_FLAGS the CPU has
    cpu_capability: str  # the vector kernels torch dispatches to: "AVX2", "AVX512", ...
    onednn_bf16: bool  # oneDNN runs bf16 kernels on this CPU (it may emulate them; see cpu_bf16_native)
    threads: int  # torch's intra-op threads
    gpu: str | None = None  # CUDA device 0's name
    gpu_bf16: bool = False

    @property
    def cpu_bf16_native(self) -> bool:
        return self.onednn_bf16 and bool(self.cpu_flags & _NATIVE_BF16_FLAGS)

    def describe(self) -> str:
        """One line: the CPU and what it has, the threads, and the GPU if any."""
        flags = " ".join(flag for flag in _REPORTED_FLAGS if flag in self.cpu_flags) or "no AVX2/AVX-512"
        bf16 = "native bf16" if self.cpu_bf16_native else "no native bf16"
        line = f"{self.cpu_model}: {flags}, torch kernels {self.cpu_capability}, {bf16}, {self.threads} threads"
        if self.gpu:
            line += f"; GPU {self.gpu} ({'bf16' if self.gpu_bf16 else 'no bf16'})"
        return line

    @property
    def kind(self) -> str:
        """What sets the speed of a run, in a few words: the GPU, or the CPU with its vector and bf16 features and
        threads. Timings compare only between runs of one kind."""
        if self.gpu:
            return self.gpu
        flags = " ".join(flag for flag in _REPORTED_FLAGS if flag in self.cpu_flags)
        return f"{self.cpu_model} ({flags or 'no AVX2/AVX-512'}), {self.threads} threads"

    def to_dict(self) -> dict[str, object]:
        return {
            "cpu_model": self.cpu_model,
            "cpu_flags": sorted(self.cpu_flags),
            "cpu_capability": self.cpu_capability,
            "cpu_bf16_native": self.cpu_bf16_native,
            "threads": self.threads,
            "gpu": self.gpu,
            "gpu_bf16": self.gpu_bf16,
            "summary": self.describe(),
            "kind": self.kind,
        }


@cache
def this_machine() -> Machine:
    """This process's machine, read once: /proc/cpuinfo, torch's CPU dispatch and oneDNN, and CUDA device 0."""
    model, flags = _cpuinfo(Path("/proc/cpuinfo"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Machine(
        cpu_model=model or platform.processor() or platform.machine(),
        cpu_flags=flags & frozenset(_REPORTED_FLAGS),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        onednn_bf16=torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        threads=torch.get_num_threads(),
        gpu=gpu,
        gpu_bf16=gpu is not None and torch.cuda.is_bf16_supported(),
    )


def _cpuinfo(path: Path) -> tuple[str, frozenset[str]]:
    """The first processor's model name and flags (x86 "flags", Arm "Features"); empty where unreadable."""
    try:
        text = path.read_text()
    except OSError:
        return "", frozenset()
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model Name") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def resolve_precision(requested: str, device: torch.device, machine: Machine | None = None) -> Precision:
    """The precision a run uses on `device`: `auto` is bf16 where the hardware has it natively, else fp32.

    An explicit bf16 where it is emulated still runs, after one warning line."""
    machine = machine or this_machine()
    native = machine.gpu_bf16 if device.type == "cuda" else machine.cpu_bf16_native
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16" and not native:
        where = f"GPU {machine.gpu}" if device.type == "cuda" else f"CPU ({machine.cpu_capability})"
        _log.warning(
            f"bf16 is not native on this {where}: it runs several times slower than fp32 here; "
            "precision auto (the default) picks fp32"
        )
    return "bf16" if requested == "bf16" else "fp32"


def inference_precision(trained_in: str, device: torch.device, machine: Machine | None = None) -> Precision:
    """bf16 autocast for a model trained in bf16, where it is native here; fp32 (slightly more exact) else."""
    return "bf16" if trained_in == "bf16" and resolve_precision("auto", device, machine) == "bf16" else "fp32"


def resolve_device(name: str) -> torch.device:
    """ "auto" is CUDA device 0 where torch sees one, else the CPU; a CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CnnlabError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device cuda asked for, but this torch sees no CUDA GPU", "train.device")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued work: CUDA runs asynchronously, so clocks are read only after this."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bytes(device: torch.device | None = None) -> int:
    """The memory a run on `device` can have: the GPU's, or this machine's physical memory."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
