"""Checkpoints: orbax managers for the last K train states and the best one.

``WORKDIR/checkpoints/<step>`` keeps the last ``keep`` states;
``WORKDIR/best/<step>`` keeps the one with the best evaluation metric. Orbax
writes each save into a temporary directory and renames it only once every
file is complete, so a crash in the middle of a save leaves the previous
checkpoints restorable (the partial directory is ignored and cleaned up on
the next start).

Faults (README "When things go wrong"):
- ``problem`` (metadata, parameter shapes) and ``try_restore`` (every
  array) say why a checkpoint cannot be restored; ``train._restore`` walks
  the steps newest first with them and ``move_aside`` renames each bad one
  to ``<step>.corrupt`` (orbax ignores that name; nothing is deleted), on
  process 0 only. The renaming is this module's one path operation besides
  orbax's, so that moving to tf.io.gfile changes one place.
- A save that fails in orbax's background thread (no space, permission, a
  bucket error) is raised as ``SaveError`` by ``check_saves`` at the next
  step boundary, naming the step, the directory and the cause.
- ``load_variables`` raises ``CheckpointError`` naming the path for a
  checkpoint it cannot read (evaluate and predict exit 2 on it).

A checkpoint holds the whole train state (a pytree whose fields include
``params`` and ``model_state``); evaluation and prediction read just those two
(``load_variables``), so any checkpoint holding a ``params`` field (and
optionally ``model_state``) will do.
"""

import dataclasses
import sys
from typing import Any, Dict, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging

from mrcnn_jax import storage


class CheckpointError(Exception):
  """A checkpoint cannot be read (the CLIs print it on one line and exit 2)."""


class SaveError(Exception):
  """A checkpoint save failed (the train CLI prints it on one line and exits 4)."""


def _orbax_record(record) -> bool:
  """Orbax's records: INFO chatter dropped; warnings and errors kept, without the
  traceback of a failed save (``SaveError`` names it in one line). asyncio's
  "Task exception was never retrieved" for orbax's write tasks loses its
  traceback too."""
  if record.name == "asyncio" and "orbax" in str(record.getMessage()):
    record.exc_info, record.exc_text = None, None
    record.msg, record.args = record.getMessage().splitlines()[0], ()
    return True
  if "orbax" not in record.pathname:
    return True
  record.exc_info, record.exc_text = None, None
  return record.levelno >= logging.WARNING


def quiet_orbax_logs() -> None:
  """Keeps orbax's per-save INFO chatter out of the training log (warnings still show)."""
  logging.get_absl_handler().addFilter(_orbax_record)


def _orbax_aftermath(exc: BaseException) -> bool:
  """An error of a failed save's leftover work: tensorstore completing a write on
  the save's asyncio loop after orbax closed it, or its coroutines collected at exit."""
  text = str(exc)
  return ((isinstance(exc, RuntimeError) and text == "Event loop is closed")
          or (isinstance(exc, ImportError) and "Python is likely shutting down" in text))


def quiet_failed_save_aftermath() -> None:
  """Keeps the aftermath of a failed asynchronous save (``_orbax_aftermath``), which
  tensorstore prints through ``sys.excepthook`` from its own threads, off stderr:
  ``SaveError`` has named the failure in one line. Other errors print as before."""
  previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(kind, value, traceback):
    if not _orbax_aftermath(value):
      previous_hook(kind, value, traceback)

  def unraisablehook(unraisable):
    if not _orbax_aftermath(unraisable.exc_value):
      previous_unraisable(unraisable)

  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def cause(e: BaseException) -> str:
  """One line for an exception: its type where the text alone does not say, its first line."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  if isinstance(e, OSError) and e.errno is not None:
    text = f"[Errno {e.errno}] {e.strerror}" + (f": {e.filename}" if e.filename else "")
  elif not text or isinstance(e, (KeyError, AttributeError, TypeError)):
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  # tensorstore's messages nest every path: keep the kind and the innermost cause.
  return text if len(text) <= 240 else f"{text[:90]} ... {text[-140:]}"


@dataclasses.dataclass
class BadCheckpoint:
  step: int
  path: str  # where it was found
  reason: str
  moved_to: Optional[str] = None  # where it was renamed aside


def _manager(directory: str, **options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      storage.abspath(directory),
      options=ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True,
                                           **options))


class Checkpointer:
  """Saves and restores train states under ``workdir``."""

  def __init__(self, workdir: str, keep: int = 3, best_metric: Optional[str] = None,
               best_mode: str = "max"):
    self.best_metric = best_metric
    self.last = _manager(storage.join(workdir, "checkpoints"), max_to_keep=keep)
    self.best = None
    if best_metric:
      self.best = _manager(storage.join(workdir, "best"), max_to_keep=1,
                           best_fn=lambda metrics: metrics[best_metric], best_mode=best_mode)
    self._saving: Optional[int] = None  # the step of the save in flight

  def latest_step(self) -> Optional[int]:
    return self.last.latest_step()

  def all_steps(self) -> List[int]:
    return sorted(self.last.all_steps())

  def step_dir(self, step: int) -> str:
    return storage.join(str(self.last.directory), str(step))

  def restore(self, abstract_state, step: Optional[int] = None):
    """The state at ``step`` (default: latest), laid out as ``abstract_state``.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings,
    so each array comes back already placed on the mesh.
    """
    step = self.latest_step() if step is None else step
    return self.last.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def problem(self, step: int, abstract_state) -> Optional[str]:
    """Why the checkpoint at ``step`` cannot be restored as ``abstract_state``, from its
    metadata alone (None: it looks fine). Parameter shapes that differ start with
    "misfit: ": where no checkpoint fits, the caller blames the config, not the files."""
    try:
      stored = stored_param_shapes(self.step_dir(step))
    except Exception as e:  # pylint: disable=broad-except  # any unreadable metadata
      return f"unreadable metadata ({cause(e)})"
    wanted = param_shapes(abstract_state.params)
    differ = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
    if differ:
      k = differ[0]
      return (f"misfit: {len(differ)} parameters differ, e.g. {k}: stored {stored.get(k)}, "
              f"this config {wanted.get(k)}")
    return None

  def try_restore(self, abstract_state, step: int):
    """(state, None) or (None, why the checkpoint at ``step`` cannot be restored)."""
    try:
      return self.restore(abstract_state, step), None
    except Exception as e:  # pylint: disable=broad-except  # truncated or missing files
      return None, f"cannot be read ({cause(e)})"

  def move_aside(self, step: int) -> str:
    """Renames checkpoint ``step`` to ``<step>.corrupt`` (``-N`` when taken); process 0
    only. Orbax ignores the new name, so the step can be saved again."""
    source = self.step_dir(step)
    target, n = source + ".corrupt", 1
    while storage.exists(target):
      n += 1
      target = f"{source}.corrupt-{n}"
    if jax.process_index() == 0:
      storage.rename(source, target)
    return target

  def reload(self) -> None:
    """Re-reads the steps on disk (after checkpoints were moved aside)."""
    self.last.reload()

  def save(self, step: int, state, force: bool = False) -> None:
    """Starts an asynchronous save of ``state``; an earlier save's failure is raised here
    as ``SaveError`` (``check_saves`` finds it sooner)."""
    self.check_saves(block=True)
    self._saving = step
    try:
      self.last.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # pylint: disable=broad-except  # the synchronous part failed
      self._saving = None
      raise SaveError(f"checkpoint save at step {step} failed: {self.step_dir(step)}: "
                      f"{cause(e)}") from e

  def check_saves(self, block: bool = False) -> None:
    """Raises ``SaveError`` if the save in flight has failed; without ``block`` a save
    still running is left to run (called at every step boundary)."""
    if self._saving is None:
      return
    if not block and self.last.is_saving_in_progress():
      return
    step, self._saving = self._saving, None
    try:
      self.last.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise SaveError(f"checkpoint save at step {step} failed: {self.step_dir(step)}: "
                      f"{_root_cause(e)}") from e

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
    self.check_saves(block=True)
    if self.best is not None:
      try:
        self.best.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        raise SaveError(f"best checkpoint save failed: {self.best.directory}: "
                        f"{_root_cause(e)}") from e

  def close(self) -> None:
    self.wait()
    self.last.close()
    if self.best is not None:
      self.best.close()

  def abandon(self) -> None:
    """Closes after a failure without raising again (what failed was reported)."""
    for manager in (self.last, self.best):
      try:
        if manager is not None:
          manager.close()
      except Exception:  # pylint: disable=broad-except
        pass


def _root_cause(e: BaseException) -> str:
  """The innermost exception's line: orbax wraps the OSError / tensorstore error."""
  seen = set()
  while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return cause(e)


def resolve(path: str) -> str:
  """A checkpoint step directory from ``path``: a step dir, a manager dir, or a workdir."""
  path = storage.abspath(path)
  try:
    storage.check_reachable(path, "checkpoint")
  except storage.UnreachableError as e:  # the CLIs name it and exit 2
    raise CheckpointError(str(e)) from None
  if not storage.isdir(path):
    raise FileNotFoundError(f"checkpoint {path}: no such directory")
  if storage.isdir(storage.join(path, "checkpoints")):
    path = storage.join(path, "checkpoints")
  steps = [d for d in storage.listdir(path) if d.isdigit()]
  if steps and not storage.exists(storage.join(path, "_CHECKPOINT_METADATA")):
    path = storage.join(path, max(steps, key=int))
  if not storage.isdir(storage.join(path, "default")):
    raise FileNotFoundError(f"checkpoint {path}: not an orbax checkpoint (no 'default' item)")
  return path


def stored_param_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
  """``{key path: shape}`` of the ``params`` a checkpoint at ``path`` holds (metadata only)."""
  item = storage.join(resolve(path), "default")
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(item)
  tree = getattr(metadata, "item_metadata", metadata)  # a mapping of the state's fields
  if tree is None or not hasattr(tree, "keys"):
    raise CheckpointError(f"checkpoint {item}: no readable metadata")
  return param_shapes(tree["params"] if "params" in tree.keys() else {})


def param_shapes(params) -> Dict[str, Tuple[int, ...]]:
  """``{key path: shape}`` of a parameter tree (arrays, shape structs or array metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def load_variables(path: str) -> Dict[str, Any]:
  """``{"params": ..., **model_state}`` (host numpy arrays) from a checkpoint at ``path``."""
  step_dir = resolve(path)
  item = storage.join(step_dir, "default")
  # Restore onto this process's first device whatever mesh wrote it (a
  # multi-host run's checkpoint is read back on one machine).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(item)
      tree = getattr(metadata, "item_metadata", metadata)
      if tree is None:
        raise CheckpointError("no readable metadata")
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            tree)
      raw = jax.device_get(checkpointer.restore(item, target))
  except Exception as e:  # pylint: disable=broad-except  # truncated or missing files
    raise CheckpointError(f"checkpoint {step_dir} cannot be read ({cause(e)})") from None
  raw = raw if isinstance(raw, dict) else raw.__dict__
  if "params" not in raw:
    raise CheckpointError(f"checkpoint {step_dir}: holds {sorted(raw)}, no 'params'")
  return {"params": raw["params"], **(raw.get("model_state") or {})}
