"""The machine a measurement ran on, the arithmetic of its peak multiply-accumulate rate,
and the report files every measurement writes.

Everything here is plain parsing and arithmetic (no TensorFlow), so it is cheap to call and
to test: :func:`parse_cpuinfo` reads ``/proc/cpuinfo`` text, :func:`peak_macs_per_cycle`
states how many multiply-accumulates one core can start per cycle from its ISA flags, and
:func:`efficiency_pct` puts a measured rate against that peak. :func:`describe` is the one
machine description; :func:`provenance` and :func:`write_report` start and write a report.

A leaf module (the standard library only; matplotlib is the caller's, through ``plot``):
``jobs.sweep`` and the benchmarks in ``cluster.bench`` both use it, and keeping it in
``jobs`` keeps the imports one way (``cluster`` may import ``jobs``, never the reverse).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# ISA flags that decide int8/float inference speed, in the order the machine line shows them.
INTERESTING_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
)
# Vector FMA pipes per core assumed for the peak: two on every x86 core that has AVX2+FMA
# (Intel since Haswell, AMD since Zen 2); AVX-512 parts with one FMA pipe exist - see the note.
FMA_PIPES = 2
AMX_INT8_MACS_PER_CYCLE = 1024  # one AMX TMUL: 16x64 int8 by 64x16 int8 per 16 cycles


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says about the CPU."""

    model: str
    logical_cpus: int
    mhz: float | None
    flags: tuple[str, ...] = field(default_factory=tuple)

    def has(self, flag: str) -> bool:
        """Whether the CPU reports this ISA flag."""
        return flag in self.flags


def parse_cpuinfo(text: str) -> CpuInfo:
    """The model name, logical CPU count, clock (MHz) and interesting flags from cpuinfo text."""
    model, mhz, flags = "", None, set[str]()
    processors = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            processors += 1
        elif key == "model name" and not model:
            model = value
        elif key == "cpu MHz" and mhz is None:
            try:
                mhz = float(value)
            except ValueError:
                mhz = None
        elif key == "flags" and not flags:
            flags = set(value.split())
    if mhz is None:
        # Some kernels omit "cpu MHz"; Intel model names carry the nominal clock ("@ 2.10GHz").
        match = re.search(r"@\s*([0-9.]+)\s*GHz", model)
        mhz = float(match.group(1)) * 1000 if match else None
    wanted = tuple(f for f in INTERESTING_FLAGS if f in flags)
    return CpuInfo(model or platform.processor() or "unknown", processors, mhz, wanted)


def vector_bits(cpu: CpuInfo) -> int:
    """Widest SIMD register the CPU reports (512, 256 or 128 bits)."""
    if cpu.has("avx512f"):
        return 512
    if cpu.has("avx2") or cpu.has("avx"):
        return 256
    return 128


def peak_macs_per_cycle(cpu: CpuInfo, dtype: str) -> tuple[int, str]:
    """(multiply-accumulates one core can issue per cycle for dtype, how that was computed).

    float32: vector lanes x FMA pipes. int8: one byte-pair product per byte of vector, per
    pipe (VPMADDUBSW on AVX2, VPDPBUSD with VNNI - the same products per instruction, VNNI
    just needs fewer instructions to accumulate them); with AMX, the tile unit's 1024/cycle.
    """
    bits = vector_bits(cpu)
    if dtype == "float32":
        lanes = bits // 32
        pipes = FMA_PIPES if cpu.has("fma") or bits == 512 else 1
        return lanes * pipes, f"{lanes} fp32 lanes ({bits}-bit) x {pipes} FMA pipes"
    if dtype == "int8":
        if cpu.has("amx_int8"):
            return AMX_INT8_MACS_PER_CYCLE, "AMX TMUL int8 (1024 MAC/cycle)"
        lanes = bits // 8
        via = "VPDPBUSD (VNNI)" if cpu.has("avx512_vnni") or cpu.has("avx_vnni") \
            else "VPMADDUBSW (no VNNI)"
        return lanes * FMA_PIPES, f"{lanes} int8 products ({bits}-bit {via}) x {FMA_PIPES} pipes"
    raise ValueError(f"unknown dtype {dtype!r}; expected float32 or int8")


def peak_mac_rate(cpu: CpuInfo, dtype: str, cores: int = 1) -> tuple[float, str]:
    """(peak MAC/s of `cores` cores at the reported clock, the formula in words)."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    per_cycle, how = peak_macs_per_cycle(cpu, dtype)
    if not cpu.mhz:
        raise ValueError("the CPU clock is unknown (no 'cpu MHz' in /proc/cpuinfo)")
    rate = per_cycle * cpu.mhz * 1e6 * cores
    return rate, (f"{cores} core(s) x {cpu.mhz / 1000:.2f} GHz (cpu MHz in /proc/cpuinfo, "
                  f"no turbo) x {per_cycle} MAC/cycle [{how}] = {rate / 1e9:.1f} GMAC/s")


def efficiency_pct(macs_per_image: float, images_per_s: float, peak_macs_per_s: float) -> float:
    """Achieved MAC/s (MACs per image x images/s) as a percentage of the peak MAC/s."""
    if peak_macs_per_s <= 0:
        raise ValueError(f"peak must be > 0, got {peak_macs_per_s}")
    if macs_per_image < 0 or images_per_s < 0:
        raise ValueError("MACs and images/s must be >= 0")
    return 100.0 * macs_per_image * images_per_s / peak_macs_per_s


def gpus() -> list[str]:
    """GPU names from nvidia-smi, [] when there is none (or no driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.startswith("GPU")]


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages (the benchmark shares the machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def describe(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The machine as JSON: CPU, cores, flags, clock, GPUs, load average, date."""
    try:
        cpu = parse_cpuinfo(cpuinfo_path.read_text())
    except OSError:
        cpu = CpuInfo(platform.processor() or "unknown", 0, None, ())
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return {
        **asdict(cpu),
        "flags": list(cpu.flags),
        "cores": usable,
        "gpus": gpus(),
        "loadavg": load_average(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line for a report: CPU, cores, clock, flags, GPU, load, date."""
    clock = f" @ {info['mhz'] / 1000:.2f} GHz" if info.get("mhz") else ""
    flags = ", ".join(info.get("flags") or []) or "none of note"
    gpu = "; ".join(info.get("gpus") or []) or "no GPU"
    load = "/".join(f"{x:.2f}" for x in info.get("loadavg") or []) or "unknown"
    vnni = "yes" if {"avx512_vnni", "avx_vnni"} & set(info.get("flags") or []) else "no"
    amx = "yes" if "amx_int8" in (info.get("flags") or []) else "no"
    avx512 = "yes" if "avx512f" in (info.get("flags") or []) else "no"
    return (f"{info.get('model', 'unknown')}{clock}, {info.get('cores')} cores; "
            f"AVX-512 {avx512}, VNNI {vnni}, AMX {amx} (flags: {flags}); {gpu}; "
            f"load average {load} (1/5/15 min); {info.get('date', '')}")


def cpu_from(info: dict[str, Any]) -> CpuInfo:
    """The CpuInfo back from :func:`describe`'s JSON."""
    return CpuInfo(info["model"], int(info.get("logical_cpus") or 0), info.get("mhz"),
                   tuple(info.get("flags") or ()))


def provenance(command: str, info: dict[str, Any], loadavg_after: list[float]) -> list[str]:
    """The lines every report starts a table with: the exact command and the machine."""
    return [f"Command: `{command}`", "",
            f"Machine: {machine_line(info)}; load average after: "
            f"{'/'.join(str(x) for x in loadavg_after)}.", ""]


def write_report(out_dir: Path, stem: str, results: dict[str, Any], markdown: str,
                 plot: Callable[[dict[str, Any], Path], None]) -> list[Path]:
    """STEM.json (results), STEM.md (markdown) and STEM.png (plot(results, path)) in out_dir."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    paths[1].write_text(markdown, encoding="utf-8")
    plot(results, paths[2])
    return paths
