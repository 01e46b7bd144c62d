"""mrcnn_jax: Mask R-CNN (He et al., arXiv 1703.06870) in JAX/Flax.

Static-shaped end to end, so one compiled program serves a whole run on CPU,
GPU or TPU. See ``mrcnn_jax.ops`` for the parameter-free detection ops.
"""

__version__ = "0.1.0"
