"""mrcnn_jax/xla_flags.py: importing mrcnn_jax takes XLA:CPU's convolutions out of YNNPACK."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import mrcnn_jax
from mrcnn_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN = xla_flags.JAXLIB_VERSIONS[0]


def _compiled_conv_text() -> str:
  """XLA:CPU's optimised HLO of a mask-head-sized conv (big enough for YNNPACK to take)."""
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x, w = jnp.ones((64, 14, 14, 256)), jnp.ones((3, 3, 256, 256))
  return jax.jit(conv).lower(x, w).compile().as_text()


@pytest.mark.parametrize("before,after", [
    ({}, {"XLA_FLAGS": xla_flags.FLAG}),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
     {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 " + xla_flags.FLAG}),
])
def test_adds_the_flag_to_the_others(before, after):
  env = dict(before)
  assert xla_flags.prefer_xla_convolutions(env, KNOWN)
  assert env == after
  assert not xla_flags.prefer_xla_convolutions(env, KNOWN)  # once only
  assert env == after


@pytest.mark.parametrize("env,version", [
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"}, KNOWN),
    ({"MRCNN_XLA_CPU_FLAGS": "0"}, KNOWN),   # opted out
    ({}, "0.0.1"),                           # a jaxlib this was not measured on
    ({}, None),                              # no jaxlib installed
])
def test_leaves_xla_flags_alone(env, version, monkeypatch):
  monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: None)
  before = dict(env)
  assert not xla_flags.prefer_xla_convolutions(env, version)
  assert env == before


def test_installed_jaxlib_was_measured():
  """requirements.txt pins jaxlib; a new pin must be measured with the flag (the
  numbers in xla_flags' docstring) and added to JAXLIB_VERSIONS, or the flag
  silently stops being set."""
  version = xla_flags._jaxlib_version()  # pylint: disable=protected-access
  assert version in xla_flags.JAXLIB_VERSIONS, version


def test_this_process_runs_xla_convolutions():
  """The suite imports mrcnn_jax before any JAX computation, as users do."""
  assert mrcnn_jax.__version__
  assert xla_flags.FLAG in os.environ["XLA_FLAGS"]
  text = _compiled_conv_text()
  assert "convolution(" in text and "ynn_fusion" not in text, text


_PROBE = """
import jax, jax.numpy as jnp
if {touch}:
  jnp.ones(1).block_until_ready()
import mrcnn_jax
from tests.test_xla_flags import _compiled_conv_text
print("YNN" if "ynn_fusion" in _compiled_conv_text() else "XLA")
"""


@pytest.mark.parametrize("touch,want", [(False, "XLA"), (True, "YNN")])
def test_a_fresh_process(touch, want):
  """Imported first, the flag takes effect; imported after JAX started, a warning
  says it cannot (and XLA's YNNPACK default stands)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MRCNN_XLA_CPU_FLAGS")}
  proc = subprocess.run([sys.executable, "-c", _PROBE.format(touch=touch)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split()[-1] == want, proc.stdout + proc.stderr
  assert ("imported after JAX started its backends" in proc.stderr) == touch, proc.stderr
