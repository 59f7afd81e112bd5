"""The CPU's multiply-accumulate peak, measured: what ``bench model`` puts efficiencies against
beside :mod:`jobs.machine`'s peak computed from /proc/cpuinfo.

The computed peak takes ``cpu MHz`` (the nominal clock; a VM's guest often runs boosted) and
assumes two full-width vector pipes; some AVX-512 cores (AMD Zen 4) run a 512-bit
instruction on two 256-bit halves, one per cycle. So a small C loop is compiled with the
system's compiler (``cc -O2 -march=native``) and run on one core: 12 independent
accumulators of VPDPBUSD (int8, AVX-512 VNNI) and of VFMADD (fp32), plus a chain of
dependent integer adds (1 per cycle) for the clock it really runs at. CPU time of the
thread, so time spent waiting for a core on a shared machine does not count. No compiler,
no AVX-512 VNNI: ``None`` and why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void) {
  struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
#define N 12
int main(void) {
  long iters = ITERS, s = 0;
  __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2), acc[N];
  for (int i = 0; i < N; i++) acc[i] = _mm512_setzero_si512();
  double t0 = now();
  for (long it = 0; it < iters; it++) {
#pragma GCC unroll 12
    for (int i = 0; i < N; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
  }
  double t_int8 = now() - t0;
  for (int i = 0; i < N; i++) s += _mm_cvtsi128_si32(_mm512_castsi512_si128(acc[i]));
  __m512 x = _mm512_set1_ps(0.5f), y = _mm512_set1_ps(0.25f), f[N];
  for (int i = 0; i < N; i++) f[i] = _mm512_setzero_ps();
  t0 = now();
  for (long it = 0; it < iters; it++) {
#pragma GCC unroll 12
    for (int i = 0; i < N; i++) f[i] = _mm512_fmadd_ps(f[i], x, y);
  }
  double t_fp32 = now() - t0;
  float fs = 0; for (int i = 0; i < N; i++) fs += _mm512_cvtss_f32(f[i]);
  long c = 0; t0 = now();
  for (long it = 0; it < iters * 4; it++)
    __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(c));
  double t_clock = now() - t0;
  printf("{\"int8_macs_per_s\": %.6g, \"fp32_macs_per_s\": %.6g, \"clock_hz\": %.6g, "
         "\"check\": %ld}\n", iters * N * 64.0 / t_int8, iters * N * 16.0 / t_fp32,
         iters * 16.0 / t_clock, s + c + (long)(fs > 0));
  return 0;
}
"""


def measure_peak(iterations: int = 20_000_000, compiler: str = "cc") -> dict[str, Any]:
    """Measured one-core peaks (GMAC/s), the clock (GHz) and MACs per cycle, or
    ``{"error": why}``."""
    cc = shutil.which(compiler)
    if cc is None:
        return {"error": f"no C compiler ({compiler}) to build the peak loop"}
    with tempfile.TemporaryDirectory(prefix="framecast-peak-") as scratch:
        source, binary = Path(scratch) / "peak.c", Path(scratch) / "peak"
        source.write_text(SOURCE.replace("ITERS", str(int(iterations))), encoding="utf-8")
        built = subprocess.run([cc, "-O2", "-march=native", "-o", str(binary), str(source)],
                               capture_output=True, text=True, timeout=120, check=False)
        if built.returncode != 0:
            return {"error": f"the peak loop did not build (no AVX-512 VNNI?): "
                             f"{built.stderr.strip()[-300:]}"}
        ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300,
                             check=False)
        if ran.returncode != 0:
            return {"error": f"the peak loop failed (exit {ran.returncode}): {ran.stderr[-300:]}"}
    raw = json.loads(ran.stdout)
    clock = raw["clock_hz"]
    return {
        "int8_gmacs_1core": round(raw["int8_macs_per_s"] / 1e9, 1),
        "fp32_gmacs_1core": round(raw["fp32_macs_per_s"] / 1e9, 1),
        "clock_ghz": round(clock / 1e9, 2),
        "int8_macs_per_cycle": round(raw["int8_macs_per_s"] / clock, 1),
        "fp32_macs_per_cycle": round(raw["fp32_macs_per_s"] / clock, 1),
        "how": ("measured on one core: 12 independent 512-bit VPDPBUSD (64 int8 MACs each) "
                "and VFMADD231PS (16 fp32 MACs each) chains, clock from dependent integer "
                "adds; thread CPU time"),
    }


if __name__ == "__main__":
    print(json.dumps(measure_peak(), indent=2))
