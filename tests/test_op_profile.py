"""scripts/op_profile.py: instruction names traced back to JAX ops, and a real trace ranked."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
import op_profile  # noqa: E402  pylint: disable=g-import-not-at-top

HLO = """HloModule m

%fused_computation.1 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %mul.1 = f32[4]{0} multiply(%p, %p), metadata={op_name="jit(step)/jvp(Model)/head/mul"}
}

%fused_computation.2 (p.1: f32[4]) -> f32[2,2] {
  %p.1 = f32[4]{0} parameter(0)
  ROOT %convolution.3 = f32[2,2]{1,0} convolution(%p.1, %p.1), window={size=1}
}

ENTRY %main (x: f32[4]) -> (f32[4], f32[2,2]) {
  %x = f32[4]{0} parameter(0)
  %fusion.1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation.1
  %fusion.2 = f32[2,2]{1,0} fusion(%x), kind=kCustom, calls=%fused_computation.2
  %add.4 = f32[4]{0} add(%fusion.1, %x), metadata={op_name="jit(step)/transpose(jvp(Model))/add"}
  ROOT %tuple.5 = (f32[4], f32[2,2]) tuple(%add.4, %fusion.2)
}
"""


def test_hlo_op_names_by_hand():
  """Own metadata; else the called computation's first op_name; else its root's opcode and
  shape; else the instruction's own. jit(...)/ prefixes are dropped."""
  names = op_profile.hlo_op_names(HLO)
  assert names["add.4"] == "transpose(jvp(Model))/add"
  assert names["fusion.1"] == "jvp(Model)/head/mul"
  assert names["fusion.2"] == "[convolution f32[2,2]{1,0}]"
  assert names["mul.1"] == "jvp(Model)/head/mul"
  assert names["tuple.5"] == "[tuple (f32[4], f32[2,2])]" and names["x"] == "[parameter f32[4]{0}]"


def test_top_ops_ranks_a_traced_program():
  """A program of one big matmul and a tiny reduction: the matmul ranks first, named by its
  JAX op; shares sum to at most 1; at most ``top`` rows.

  The matmul (2 GFLOP, milliseconds) outweighs the 64-element sum (microseconds) by
  orders of magnitude, and the traced step runs the program three times: a thread
  preempted in the middle of the sum on a loaded machine (once 4 ms for a 512^2 sum,
  against that matmul's 2 ms) no longer reorders them.
  """
  def f(a, c):
    return a @ a, jnp.sum(c)
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(1024, 1024)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(64,)), jnp.float32)
  jitted = jax.jit(f)
  text = jitted.lower(a, c).compile().as_text()
  jax.block_until_ready(jitted(a, c))
  rows = op_profile.top_ops(lambda: [jax.block_until_ready(jitted(a, c)) for _ in range(3)],
                            text, top=3)
  assert 1 <= len(rows) <= 3
  assert rows[0]["ms"] > 0 and "dot_general" in rows[0]["op"], rows
  assert sum(r["share"] for r in rows) <= 1 + 1e-9
  assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
