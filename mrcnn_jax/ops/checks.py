"""Trace-time shape checks, so a wrong input fails with a message, not deep inside XLA."""

from typing import Any, Mapping, Optional, Sequence, Union

Dim = Union[int, str, None]


def check_shape(name: str, x: Any, expected: Sequence[Dim],
                dims: Optional[dict] = None) -> dict:
  """Raises ValueError unless ``x.shape`` matches ``expected``.

  Args:
    name: the argument's name, used in the message.
    x: an array (or anything with ``.shape``).
    expected: one entry per axis: an int (exact size), a letter (any size, but
      the same everywhere that letter appears in ``dims``), or None (any size).
    dims: letter -> size bindings shared between calls; updated in place.

  Returns:
    ``dims`` (a new dict if none was given), with this call's letters bound.
  """
  dims = {} if dims is None else dims
  shape = tuple(getattr(x, "shape", ()))
  spec = "[" + ", ".join("?" if d is None else str(d) for d in expected) + "]"
  if len(shape) != len(expected):
    raise ValueError(f"{name}: expected shape {spec}{_bound(dims, expected)}, "
                     f"got {list(shape)} (rank {len(shape)}, not {len(expected)})")
  for axis, (got, want) in enumerate(zip(shape, expected)):
    if want is None:
      continue
    if isinstance(want, str):
      want = dims.setdefault(want, got)
    if got != want:
      raise ValueError(f"{name}: expected shape {spec}{_bound(dims, expected)}, "
                       f"got {list(shape)} (axis {axis} is {got}, not {want})")
  return dims


def _bound(dims: Mapping[str, int], expected: Sequence[Dim]) -> str:
  letters = [d for d in expected if isinstance(d, str) and d in dims]
  if not letters:
    return ""
  return " with " + ", ".join(f"{d}={dims[d]}" for d in dict.fromkeys(letters))
