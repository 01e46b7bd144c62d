"""Where a compiled step spends its time, op by op, for scripts/benchmark.py --op_profile.

``top_ops`` traces one call with ``jax.profiler`` and ranks the XLA
instructions of the compiled program by their time in the trace;
``hlo_op_names`` names each instruction by the JAX op it came from (the
model code's module path and primitive), so that a slow convolution or copy
points at a line of the model.

A blind spot: XLA:CPU's own convolutions run asynchronously on Eigen's
thread pool, and their trace event covers only the launch (measured: 2 ms of
a 60-ms convolution), so they rank far below their cost; the benchmark's
stage breakdown times them.
"""

import collections
import glob
import os
import re
import tempfile
from typing import Callable, Dict, List

import jax


def hlo_op_names(hlo_text: str) -> Dict[str, str]:
  """Instruction name -> the JAX op it came from, for every instruction of an HLO module.

  The ``op_name`` metadata without its ``jit(...)/`` prefixes; for a fusion
  without one, the first ``op_name`` inside the computation it calls; failing
  that (ops XLA made itself), ``[opcode shape]`` of that computation's root,
  or of the instruction itself when it calls none (a copy XLA inserted).
  """
  own, calls, inside, root, itself = {}, {}, {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    header = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(", line)
    if header:
      computation = header.group(1)
      continue
    m = re.match(r"\s*(ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\(", line)
    if not m:
      continue
    name = re.search(r'op_name="([^"]*)"', line)
    name = re.sub(r"jit\([^)]*\)/", "", name.group(1)) if name else ""
    own[m.group(2)] = name
    itself[m.group(2)] = f"[{m.group(4)} {m.group(3)}]"
    called = re.search(r"calls=%([\w.\-]+)", line)
    if called:
      calls[m.group(2)] = called.group(1)
    if computation is not None:
      if name and computation not in inside:
        inside[computation] = name
      if m.group(1):
        root[computation] = f"[{m.group(4)} {m.group(3)}]"
  return {n: op or inside.get(calls.get(n)) or root.get(calls.get(n)) or itself[n]
          for n, op in own.items()}


def top_ops(run_step: Callable[[], object], hlo_text: str, top: int,
            log: Callable[[str], None] = print) -> List[Dict]:
  """The ``top`` most expensive XLA ops of one traced ``run_step()`` (synchronised).

  ``hlo_text`` is the compiled program's (``compiled.as_text()``). Trace
  events named after one of its instructions are summed per instruction (on
  CPU, over the threads that ran it: an op split over two threads counts
  twice) and named by ``hlo_op_names``.
  """
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  op_names = hlo_op_names(hlo_text)
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir):
      run_step()
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
      space.ParseFromString(f.read())
  seconds = collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if name in op_names:
          seconds[name] += event.duration_ps * 1e-12
  if not seconds:
    log("op profile: no trace event is named after an instruction of the program")
    return []
  total = sum(seconds.values())
  return [{"instruction": name, "op": op_names[name], "ms": s * 1e3, "share": s / total}
          for name, s in seconds.most_common(top)]
