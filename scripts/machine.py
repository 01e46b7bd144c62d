"""What a benchmark ran on: the CPU's model and the matrix/vector extensions that
decide bfloat16 speed (AMX tiles, AVX512-BF16), from /proc/cpuinfo (Linux x86).

Benchmark numbers from machines that differ here are not comparable: with AMX
a bfloat16 matmul runs several times faster than float32; with AVX512-BF16
alone about twice as fast (docs/performance.md, "bfloat16").
"""

import platform

MATRIX_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx2")


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> dict:
  """``{"model": ..., "flags": [the MATRIX_FLAGS present]}``; the model is
  ``platform.processor()`` or the machine name where cpuinfo is unreadable."""
  model, flags = None, set()
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  return {"model": model or platform.processor() or platform.machine(),
          "flags": [f for f in MATRIX_FLAGS if f in flags]}
