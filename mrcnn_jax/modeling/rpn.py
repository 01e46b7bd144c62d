"""Region Proposal Network (Ren et al. 2015, sec. 3.1).

One head shared by every level: a 3x3 conv with ReLU (``num_convs`` of them,
named ``conv``, ``conv2``, ...: the TPU and LSJ recipes use two), then per
anchor one objectness logit and four box deltas. Outputs are flattened in the anchors'
order (position-major, then anchor; see ops/anchors.py), which is also the
order of torchvision's channels ``a * 4 + coord``, so its weights line up.
"""

from typing import List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling.conv import Conv
from mrcnn_jax.ops import proposals as proposal_ops

# torchvision and detectron2: normal(std=0.01) weights, zero biases.
rpn_init = nn.initializers.normal(0.01)


class RPNHead(nn.Module):
  """``[B, H, W, C]`` per level -> objectness ``[B, H*W*A]`` and deltas ``[B, H*W*A, 4]``."""
  num_anchors: int = 3  # A: anchors per position (sizes x aspect ratios)
  dtype: jnp.dtype = jnp.float32
  num_convs: int = 1  # shared 3x3 convs (with ReLU) before the predictors

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray]) -> Tuple[List, List]:
    channels = features[0].shape[-1]
    shared = [Conv(channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=rpn_init,
                   dtype=self.dtype, name="conv" if i == 0 else f"conv{i + 1}")
              for i in range(self.num_convs)]
    cls = Conv(self.num_anchors, (1, 1), kernel_init=rpn_init, dtype=self.dtype,
               name="objectness")
    reg = Conv(self.num_anchors * 4, (1, 1), kernel_init=rpn_init, dtype=self.dtype,
               name="deltas")
    objectness, deltas = [], []
    for x in features:
      b = x.shape[0]
      h = x
      for conv in shared:
        h = nn.relu(conv(h))
      objectness.append(cls(h).astype(jnp.float32).reshape(b, -1))
      deltas.append(reg(h).astype(jnp.float32).reshape(b, -1, 4))
    return objectness, deltas


def propose(objectness: Sequence[jnp.ndarray], deltas: Sequence[jnp.ndarray],
            anchors: Sequence, image_size: jnp.ndarray, pre_nms_topk: int,
            post_nms_topk: int, nms_threshold: float = 0.7, min_size: float = 0.0):
  """Batched ``ops.proposals.generate_proposals``; no gradient flows into proposals.

  Args:
    objectness, deltas: per level ``[B, A_l]`` and ``[B, A_l, 4]``.
    anchors: per level ``[B, A_l, 4]`` (each image's own, ops/anchors.py).
    image_size: ``[B, 2]`` (height, width) of each image in the canvas.

  Returns:
    boxes ``[B, P, 4]``, logits ``[B, P]``, valid ``[B, P]``.
  """
  objectness = [jax.lax.stop_gradient(o) for o in objectness]
  deltas = [jax.lax.stop_gradient(d) for d in deltas]

  def one(obj, dlt, anc, size):
    return proposal_ops.generate_proposals(obj, dlt, anc, (size[0], size[1]),
                                           pre_nms_topk, post_nms_topk, nms_threshold,
                                           min_size)

  return jax.vmap(one)(objectness, deltas, list(anchors), image_size.astype(jnp.float32))
