"""Transposed convolution as per-pixel matmul + overlap-add.

A k x k, stride-s transposed convolution (k a multiple of s) sends every input
pixel to a k x k patch of output, ``patch = x[h, w] @ kernel``, placed at
``(s*h, s*w)`` and summed where patches overlap. Written that way it is one
matmul and (k/s)^2 shifted adds, whose gradients are a matmul and slices.
``flax.linen.ConvTranspose`` computes the same numbers as a convolution of the
dilated input, whose backward pass runs about 6x slower on CPU
(docs/experiments.md, "Measurements behind the code").

Parameters are named and shaped as ``nn.ConvTranspose``'s (``kernel
[k, k, in, out]``, ``bias [out]``), with the same meaning: PyTorch's
``ConvTranspose2d`` weight ``[in, out, k, k]`` equals ours flipped in both
spatial axes and transposed (see the weight-import tests).
"""

import flax.linen as nn
import jax.numpy as jnp

from mrcnn_jax.modeling.conv import accumulating_dot_general


def msra_fill() -> nn.initializers.Initializer:
  """detectron2's ``c2_msra_fill`` (``kaiming_normal_(mode="fan_out")``) for a Deconv kernel.

  PyTorch stores a ConvTranspose2d weight as ``[in, out, k, k]`` and counts
  its first axis as the fan-out, so detectron2's deconvs get
  ``std = sqrt(2 / (in * k * k))``. Plain ``variance_scaling(2, "fan_out")``
  on our ``[k, k, in, out]`` kernel would count ``out * k * k`` instead: the
  same where in == out (the mask head), but for the keypoint head's
  ``score_lowres`` (512 -> 17 channels) it gives weights sqrt(512 / 17) = 5.5x
  too large, heatmap logits that start far from uniform and a keypoint loss
  whose gradient swamps every other loss in the shared backbone.
  """
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal", in_axis=-1, out_axis=-2)


class Deconv(nn.Module):
  """``[N, H, W, C] -> [N, s*H + k - s - 2p, s*W + k - s - 2p, features]``.

  ``padding`` is PyTorch's: output pixels removed from each border (p = 1 for
  the keypoint head's 4x4 stride-2 deconv gives exactly 2x).
  """
  features: int
  kernel_size: int = 2
  stride: int = 2
  padding: int = 0
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k, s, p = self.kernel_size, self.stride, self.padding
    if k % s:
      raise ValueError(f"Deconv: kernel_size {k} must be a multiple of stride {s}")
    n, h, w, c = x.shape
    kernel = self.param("kernel", self.kernel_init, (k, k, c, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    # nn.ConvTranspose correlates with the kernel as stored; placing patches
    # directly needs it flipped.
    flipped = kernel[::-1, ::-1].astype(self.dtype)
    # Every tap's contribution as one matmul [n*h*w, c] @ [c, k*k*features],
    # accumulating in float32 and rounded to the compute dtype.
    taps = jnp.moveaxis(flipped, 2, 0).reshape(c, k * k * self.features)
    patches = accumulating_dot_general(x.astype(self.dtype).reshape(-1, c), taps,
                                       (((1,), (0,)), ((), ())))
    q = k // s
    # Tap i = s * qi + ai lands on output row s * (h + qi) + ai.
    patches = patches.reshape(n, h, w, q, s, q, s, self.features)
    out = jnp.zeros((n, s * (h + q - 1), s * (w + q - 1), self.features), patches.dtype)
    for qi in range(q):
      for qj in range(q):
        block = patches[:, :, :, qi, :, qj].transpose(0, 1, 3, 2, 4, 5)  # (n, h, s, w, s, d)
        block = block.reshape(n, s * h, s * w, self.features)
        out = out + jnp.pad(block, ((0, 0), (s * qi, s * (q - 1 - qi)),
                                    (s * qj, s * (q - 1 - qj)), (0, 0)))
    if p:
      out = out[:, p:-p, p:-p]
    return out + bias.astype(out.dtype)
