"""mrcnn_jax: Mask R-CNN (He et al., arXiv 1703.06870) in JAX/Flax.

Static-shaped end to end, so one compiled program serves a whole run on CPU,
GPU or TPU. See ``mrcnn_jax.ops`` for the parameter-free detection ops.
"""

from mrcnn_jax import xla_flags

__version__ = "0.1.0"

# Before JAX starts a backend: XLA:CPU's own convolutions instead of YNNPACK's.
xla_flags.prefer_xla_convolutions()


def __getattr__(name):
  # Lazy: ``import mrcnn_jax`` stays cheap; the Predictor pulls in TF and the model.
  if name == "Predictor":
    from mrcnn_jax.predict import Predictor  # pylint: disable=g-import-not-at-top
    return Predictor
  raise AttributeError(f"module 'mrcnn_jax' has no attribute {name!r}")
