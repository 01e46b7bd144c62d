"""Checkpoints: orbax managers for the last K train states and the best one.

``WORKDIR/checkpoints/<step>`` keeps the last ``keep`` states;
``WORKDIR/best/<step>`` keeps the one with the best evaluation metric. Orbax
writes each save into a temporary directory and renames it only once every
file is complete, so a crash in the middle of a save leaves the previous
checkpoints restorable (the partial directory is ignored and cleaned up on
the next start).

A checkpoint holds the whole train state (a pytree whose fields include
``params`` and ``model_state``); evaluation and prediction read just those two
(``load_variables``), so any checkpoint holding a ``params`` field (and
optionally ``model_state``) will do.
"""

import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging


def quiet_orbax_logs() -> None:
  """Keeps orbax's per-save INFO chatter out of the training log (warnings still show)."""
  logging.get_absl_handler().addFilter(
      lambda record: "orbax" not in record.pathname or record.levelno >= logging.WARNING)


def _manager(directory: str, **options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True,
                                           **options))


class Checkpointer:
  """Saves and restores train states under ``workdir``."""

  def __init__(self, workdir: str, keep: int = 3, best_metric: Optional[str] = None,
               best_mode: str = "max"):
    self.best_metric = best_metric
    self.last = _manager(os.path.join(workdir, "checkpoints"), max_to_keep=keep)
    self.best = None
    if best_metric:
      self.best = _manager(os.path.join(workdir, "best"), max_to_keep=1,
                           best_fn=lambda metrics: metrics[best_metric], best_mode=best_mode)

  def latest_step(self) -> Optional[int]:
    return self.last.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(str(self.last.directory), str(step))

  def restore(self, abstract_state, step: Optional[int] = None):
    """The state at ``step`` (default: latest), laid out as ``abstract_state``.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings,
    so each array comes back already placed on the mesh.
    """
    step = self.latest_step() if step is None else step
    return self.last.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def save(self, step: int, state, force: bool = False) -> None:
    """Starts an asynchronous save of ``state`` (call ``wait`` before exiting)."""
    self.last.save(step, args=ocp.args.StandardSave(state), force=force)

  def save_best(self, step: int, state, metrics: Dict[str, float]) -> None:
    """Offers ``state`` to the best-checkpoint manager (kept if ``best_metric`` improved)."""
    if self.best is None:
      return
    if self.best_metric not in metrics:
      logging.warning("best checkpoint: metric %r not among %s", self.best_metric,
                      sorted(metrics))
      return
    self.best.save(step, args=ocp.args.StandardSave(state),
                   metrics={k: float(v) for k, v in metrics.items()}, force=True)

  def wait(self) -> None:
    self.last.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.last.close()
    if self.best is not None:
      self.best.close()


def resolve(path: str) -> str:
  """A checkpoint step directory from ``path``: a step dir, a manager dir, or a workdir."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path}: no such directory")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  steps = [d for d in os.listdir(path) if d.isdigit()]
  if steps and not os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
    path = os.path.join(path, max(steps, key=int))
  if not os.path.isdir(os.path.join(path, "default")):
    raise FileNotFoundError(f"checkpoint {path}: not an orbax checkpoint (no 'default' item)")
  return path


def stored_param_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
  """``{key path: shape}`` of the ``params`` a checkpoint at ``path`` holds (metadata only)."""
  item = os.path.join(resolve(path), "default")
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(item)
  tree = getattr(metadata, "item_metadata", metadata)  # a mapping of the state's fields
  return param_shapes(tree["params"] if "params" in tree.keys() else {})


def param_shapes(params) -> Dict[str, Tuple[int, ...]]:
  """``{key path: shape}`` of a parameter tree (arrays, shape structs or array metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def load_variables(path: str) -> Dict[str, Any]:
  """``{"params": ..., **model_state}`` (host numpy arrays) from a checkpoint at ``path``."""
  step_dir = resolve(path)
  item = os.path.join(step_dir, "default")
  # Restore onto this process's first device whatever mesh wrote it (a
  # multi-host run's checkpoint is read back on one machine).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(item)
    tree = getattr(metadata, "item_metadata", metadata)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          tree)
    raw = jax.device_get(checkpointer.restore(item, target))
  raw = raw if isinstance(raw, dict) else raw.__dict__
  if "params" not in raw:
    raise ValueError(f"checkpoint {step_dir}: holds {sorted(raw)}, no 'params'")
  return {"params": raw["params"], **(raw.get("model_state") or {})}
