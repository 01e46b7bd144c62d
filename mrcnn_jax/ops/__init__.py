"""Parameter-free detection ops: pure jnp, written for one image, static shapes.

Batch them with ``jax.vmap`` at the call site. Shapes in docstrings use fixed
letters: B batch, A anchors, G ground truth, N/M generic boxes, P proposals,
R RoIs, K classes, S pooled size, H W C feature map.
"""
