"""XLA:CPU flags that mrcnn_jax sets when it is imported.

jaxlib 0.10.2's XLA:CPU hands convolutions to YNNPACK by default, and
YNNPACK's convolution gradients run about twice as long as XLA's own (Eigen)
convolution's (docs/experiments.md, "Measurements behind the code").
``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` takes
convolutions out of YNNPACK and leaves its other fusions (matmuls,
elementwise) as they are.

The flag is added to ``XLA_FLAGS`` when ``mrcnn_jax`` is imported, with three
exceptions: ``XLA_FLAGS`` already names ``xla_cpu_experimental_ynn_fusion_type``
(the user's choice stands; ``...=+individual_convolution`` restores XLA's
default), the installed jaxlib is not one this was measured on (XLA aborts on
flags it does not know, and experimental flags come and go), or
``MRCNN_XLA_CPU_FLAGS=0``. XLA reads ``XLA_FLAGS`` when JAX first starts a
backend, so a process that ran JAX computations before importing
``mrcnn_jax`` keeps YNNPACK's convolutions (a warning says so). The flag
only concerns XLA:CPU; GPU and TPU compilers ignore it.
"""

import importlib.metadata
import logging
import os
import sys

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# jaxlib versions whose XLA:CPU has the flag and was measured with it.
JAXLIB_VERSIONS = ("0.10.2",)


def _jaxlib_version():
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None


def _backends_started() -> bool:
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(bridge, "_backends", None))


def prefer_xla_convolutions(environ=None, jaxlib_version=None) -> bool:
  """Adds ``FLAG`` to ``environ["XLA_FLAGS"]`` (see the module docstring).

  ``environ`` defaults to ``os.environ`` and ``jaxlib_version`` to the
  installed one. Returns whether the flag was added.
  """
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if environ.get("MRCNN_XLA_CPU_FLAGS") == "0" or "xla_cpu_experimental_ynn_fusion_type" in flags:
    return False
  version = jaxlib_version or _jaxlib_version()
  if version not in JAXLIB_VERSIONS:
    logging.debug("mrcnn_jax: jaxlib %s is not one of %s; XLA_FLAGS left as they are",
                  version, JAXLIB_VERSIONS)
    return False
  environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  if environ is os.environ and _backends_started():
    logging.warning("mrcnn_jax was imported after JAX started its backends: XLA:CPU keeps "
                    "YNNPACK's convolutions (slower on CPU). Import mrcnn_jax first, or set "
                    "XLA_FLAGS=%s before the process starts.", FLAG)
  return True
