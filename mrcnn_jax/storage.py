"""Paths as URIs: local files, file://, gs://, s3:// and whatever else TensorFlow's gfile reaches.

Every path a user gives (data, converter output, workdir, checkpoints,
exports) goes through here rather than ``open`` / ``os``. Local paths and
``file://`` URIs use the operating system directly (fast, and TensorFlow is
not imported, which the converter's worker processes rely on); any other
scheme goes through ``tf.io.gfile``. Orbax reaches buckets itself (etils
epath + tensorstore); ``abspath`` gives it a ``file://`` URI as a local path.

Reads of a byte range (``RangeReader``) are retried on errors that a bucket
gives transiently (unavailable, deadline, aborted, internal, a short or reset
connection) and then raise ``ReadError`` naming the file and what was read.
"""

import errno
import json
import os
import threading
import time
from typing import Any, Callable, List, Optional

# Tries of one read before ReadError, and the wait before the first retry
# (doubled each time): ~1.5 s in all, enough to ride over a bucket's brief
# 503/connection-reset, short enough that a dead path fails promptly.
READ_TRIES = 4
RETRY_DELAY_S = 0.1


class ReadError(OSError):
  """A read that failed after its retries (the path and the cause in the message)."""


class UnreachableError(OSError):
  """A path whose filesystem cannot be reached or used (no such scheme, no permission)."""


def is_local(path: str) -> bool:
  """True for plain paths and file:// URIs."""
  return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
  return path[len("file://"):] if path.startswith("file://") else path


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # only for remote paths
  return tf.io.gfile


def abspath(path: str) -> str:
  """An absolute local path (file:// stripped), or a remote URI unchanged."""
  return os.path.abspath(_local(path)) if is_local(path) else path


def join(path: str, *parts: str) -> str:
  return os.path.join(path, *parts)  # posix joining: right for URIs too


def basename(path: str) -> str:
  return os.path.basename(path.rstrip("/"))


def exists(path: str) -> bool:
  return os.path.exists(_local(path)) if is_local(path) else _gfile().exists(path)


def isdir(path: str) -> bool:
  return os.path.isdir(_local(path)) if is_local(path) else _gfile().isdir(path)


def listdir(path: str) -> List[str]:
  if is_local(path):
    return os.listdir(_local(path))
  return [name.rstrip("/") for name in _gfile().listdir(path)]


def makedirs(path: str) -> None:
  if is_local(path):
    os.makedirs(_local(path), exist_ok=True)
  else:
    _gfile().makedirs(path)


def rename(source: str, target: str) -> None:
  """Renames a file or directory (never overwriting ``target``)."""
  if is_local(source) and is_local(target):
    os.rename(_local(source), _local(target))
  else:
    _gfile().rename(source, target, overwrite=False)


def open_file(path: str, mode: str = "r"):
  """A file object for ``path``: builtin ``open`` locally, ``tf.io.gfile.GFile`` otherwise.

  Remote files are written when closed (a bucket object appears whole);
  "a" (append) is supported locally only: see ``AppendFile``.
  """
  if is_local(path):
    return open(_local(path), mode)  # pylint: disable=unspecified-encoding
  if "a" in mode:
    raise ValueError(f"{path}: appending is not supported on remote filesystems")
  return _gfile().GFile(path, mode)


def _not_found(e: BaseException) -> bool:
  """A missing file, as the OS or a bucket (``tf.errors.NotFoundError``) says it."""
  return isinstance(e, FileNotFoundError) or type(e).__name__ == "NotFoundError"


def read_bytes(path: str) -> bytes:
  """The whole of ``path``; a missing file is ``FileNotFoundError`` (filename ``path``)
  on every filesystem, where a bucket raises its own ``NotFoundError``."""
  try:
    with open_file(path, "rb") as f:
      return f.read()
  except Exception as e:  # pylint: disable=broad-except  # sorted by _not_found
    if _not_found(e):
      raise FileNotFoundError(errno.ENOENT, "no such file", path) from None
    raise


def read_json(path: str) -> Any:
  """``path`` parsed as JSON; a missing file is ``FileNotFoundError`` (see ``read_bytes``)."""
  return json.loads(read_bytes(path))


def write_text(path: str, text: str) -> None:
  """Writes ``path`` whole: a remote file through a temporary name and a rename, since
  some filesystems' "w" does not truncate (TF's ram://) and a reader must never see
  half a file."""
  if is_local(path):
    with open(_local(path), "w") as f:  # pylint: disable=unspecified-encoding
      f.write(text)
    return
  temporary = f"{path}.tmp-{os.getpid()}"
  with _gfile().GFile(temporary, "w") as f:
    f.write(text)
  _gfile().rename(temporary, path, overwrite=True)


def write_json(path: str, value: Any, indent: Optional[int] = None) -> None:
  write_text(path, json.dumps(value, indent=indent))


class AppendFile:
  """A text file written line by line and flushed (metrics.jsonl).

  Locally it is opened for appending. A bucket object cannot be appended to:
  the file's earlier content is read once and written back at once, and every
  ``flush`` uploads the whole file again (gfile writes the object at each
  flush), so what was flushed survives a crash as it does locally.
  """

  def __init__(self, path: str):
    self.path = path
    if is_local(path):
      self._file = open(_local(path), "a")  # pylint: disable=unspecified-encoding
    else:
      earlier = ""
      if exists(path):
        with open_file(path) as f:
          earlier = f.read()
        _gfile().remove(path)  # "w" does not truncate on every filesystem (TF's ram://)
      self._file = _gfile().GFile(path, "w")
      self._file.write(earlier)
      self._file.flush()

  def write(self, text: str) -> None:
    self._file.write(text)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _transient(e: BaseException) -> bool:
  """Whether a failed read is worth retrying (bucket hiccups, not missing files)."""
  if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
    return False
  if isinstance(e, OSError):
    return True
  import sys  # pylint: disable=g-import-not-at-top
  tf = sys.modules.get("tensorflow")
  if tf is None:
    return False
  errors = tf.errors
  return isinstance(e, (errors.UnavailableError, errors.DeadlineExceededError,
                        errors.AbortedError, errors.InternalError, errors.UnknownError,
                        errors.ResourceExhaustedError))


def retried(read: Callable[[], Any], what: str, tries: int = READ_TRIES,
            delay: float = RETRY_DELAY_S):
  """``read()``, retried on transient errors; then ``ReadError`` naming ``what``."""
  for attempt in range(tries):
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-except  # sorted by _transient
      if not _transient(e):
        raise
      if attempt == tries - 1:
        raise ReadError(f"{what}: read failed {tries} times "
                        f"({type(e).__name__}: {str(e)[:200]})") from e
      time.sleep(delay * 2 ** attempt)


class RangeReader:
  """Byte ranges of one file, by offset (thread-safe).

  Locally ``os.pread`` (no shared file position); remotely one gfile handle
  per thread, seeked to each offset. ``read`` returns fewer bytes than asked
  only at the end of the file.
  """

  def __init__(self, path: str):
    self.path = path
    self._local = is_local(path)
    if self._local:
      self._fd = os.open(_local(path), os.O_RDONLY)
      self._close_fd = os.close  # kept: a reader closed at interpreter exit may outlive os
    else:
      if not _gfile().exists(path):
        raise FileNotFoundError(f"{path}: no such file")
      self._threads = threading.local()
      self._handles = []
    self._closed = False

  def read_once(self, offset: int, length: int) -> bytes:
    """One attempt (no retry)."""
    if self._closed:
      raise ValueError(f"{self.path}: read from a closed file")
    if self._local:
      return os.pread(self._fd, length, offset)
    handle = getattr(self._threads, "handle", None)
    if handle is None:
      handle = self._threads.handle = _gfile().GFile(self.path, "rb")
      self._handles.append(handle)
    try:
      handle.seek(offset)
      return handle.read(length)
    except Exception:
      self._threads.handle = None  # a broken connection: reopen on the next try
      raise

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    if self._local:
      self._close_fd(self._fd)
    else:
      for handle in self._handles:
        try:
          handle.close()
        except Exception:  # pylint: disable=broad-except  # closing a broken handle
          pass


def check_reachable(path: str, what: str) -> None:
  """Raises ``UnreachableError`` naming ``what`` and ``path`` when its filesystem
  cannot be used (an unknown scheme, no permission, a bucket that does not
  answer), before hours of work depend on it. A missing path is not an error here."""
  try:
    exists(path)
    parent = os.path.dirname(path.rstrip("/"))
    if parent and not parent.rstrip("/").endswith(":"):  # not a scheme's root ("gs:", "file://")
      exists(parent)
  except Exception as e:  # pylint: disable=broad-except  # OSError or any tf.errors.OpError
    raise UnreachableError(f"{what} {path}: cannot be reached ({type(e).__name__}: "
                           f"{str(e)[:200]})") from None


def check_checkpoint_reachable(path: str, what: str) -> None:
  """``check_reachable``, and also reachable by orbax, which opens paths through etils
  epath (local, gs://, s3://, ...): a scheme only TensorFlow's gfile knows (its
  ram://, say) raises ``UnreachableError`` naming ``what`` and ``path`` before any
  training, rather than at the first save."""
  check_reachable(path, what)
  if is_local(path):
    return
  from etils import epath  # pylint: disable=g-import-not-at-top
  try:
    epath.Path(path)
  except KeyError:  # epath looks its schemes up in a table
    scheme = path.split("://", 1)[0]
    raise UnreachableError(f"{what} {path}: checkpoints are written by orbax, which cannot "
                           f"reach {scheme}:// (it reaches local paths, gs:// and the "
                           f"other schemes etils epath knows)") from None
