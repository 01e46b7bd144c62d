"""Per-record cost of the TFDS source against a converted split, on synthetic 480 x 640 images.

    PYTHONPATH=. python scripts/benchmark_tfds_source.py DIR N

Writes N train and N val shapes images under DIR (once), converts them, and
prepares the TFDS test builder's "masks" and "boxes" datasets
(tests/data/test_tfds_source.py) as array_record and tfrecord; then prints,
per record of the val split, the time to open the split (its index pass),
to read a record (a converted split: the framed bytes; TFDS: the record
rebuilt in the converted schema) and to build the COCO ground truth.
"""

import pathlib
import sys
import time

import tests.conftest  # noqa: F401  pylint: disable=unused-import  # torch before TensorFlow
from mrcnn_jax.data import coco, records, synthetic
from mrcnn_jax.data.tfds_source import TfdsSplit
from tests.data import test_tfds_source


def prepare(root: pathlib.Path, n: int) -> None:
  synthetic.main(["--output", str(root / "raw"), "--train", str(n), "--val", str(n),
                  "--height", "480", "--width", "640", "--seed", "1", "--workers", "1"])
  for split in ("train", "val"):
    coco.convert(str(root / "raw" / split),
                 str(root / "raw" / "annotations" / f"instances_{split}.json"),
                 str(root / "tf" / split), num_shards=2, workers=1)
  test_tfds_source.ShapesDetection.raw = root / "raw"
  for name in ("masks", "boxes"):
    for fmt in ("array_record", "tfrecord"):
      test_tfds_source.ShapesDetection(config=name, data_dir=str(root / f"tfds_{fmt}"),
                                       file_format=fmt).download_and_prepare()


def seconds(fn, repeats: int = 3) -> float:
  """The fastest of ``repeats`` calls (a shared machine's noise only adds)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  root, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
  if not (root / "tf").exists():
    prepare(root, n)
  split = records.RecordFile(str(root / "tf" / "val"))
  per = seconds(lambda: [split.read(i) for i in range(len(split))]) / len(split)
  print(f"converted: read {per * 1e3:.2f} ms/record")
  for fmt in ("array_record", "tfrecord"):
    for name in ("masks", "boxes"):
      measure(f"tfds {fmt} {name}", (f"shapes_detection/{name}", "validation",
                                     str(root / f"tfds_{fmt}")))


def measure(label: str, args) -> None:
  """Prints the per-record cost of opening, reading and building the ground truth."""
  split = TfdsSplit(*args)
  opened = seconds(lambda: TfdsSplit(*args), repeats=2)
  read = seconds(lambda: [split.read(i) for i in range(len(split))])
  truth = seconds(lambda: TfdsSplit(*args).ground_truth(), repeats=1) - opened
  ms = lambda t: f"{t / len(split) * 1e3:.2f} ms/record"
  print(f"{label}: open (index pass) {ms(opened)}, read {ms(read)}, ground truth {ms(truth)}")

if __name__ == "__main__":
  main()
