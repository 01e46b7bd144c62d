"""Four processes of two devices each train and evaluate as one process of eight.

jax.distributed on localhost (gloo collectives), through the train CLI as a
user would run it on a pod: each process reads its own slice of every batch,
the gradient all-reduce crosses processes, and evaluation's results are
gathered to process 0 for scoring. Launcher and dataset come from
tests/test_train.py.
"""

import json
import os

import numpy as np
import pytest

from tests.test_train import _free_port, cli_flags, dataset, run_cli  # noqa: F401  pylint: disable=unused-import

pytestmark = pytest.mark.slow
# Three steps: at the fourth, float noise from the all-reduce's order (1e-7)
# tips a near-tie in the untrained RPN's top-k and the runs part for good.
STEPS = 3


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_four_processes_of_two_devices_match_one_of_eight(dataset, tmp_path):  # noqa: F811
  flags = ["--config=configs/shapes.py:tiny", *cli_flags(
      dataset, total_steps=STEPS, **{"train.log_every": 1, "train.checkpoint_every": STEPS,
                                     "train.eval_every": STEPS, "eval.workers": 0})]
  port = _free_port()
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [run_cli("train", [f"--workdir={tmp_path / 'four'}", *flags,
                             f"--coordinator_address=localhost:{port}", "--num_processes=4",
                             f"--process_id={i}"], env=env)
           for i in range(4)]
  single = run_cli("train", [f"--workdir={tmp_path / 'one'}", *flags],
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  outs = [p.communicate(timeout=900)[0] for p in [*procs, single]]
  for p, out in zip([*procs, single], outs):
    assert p.returncode == 0, out[-5000:]
  assert "4 processes" in outs[0] and "8 devices" in outs[0], outs[0][-3000:]

  four, one = _lines(tmp_path / "four"), _lines(tmp_path / "one")
  train_keys = [k for k in one[0] if k.startswith("train/loss")]
  assert "train/loss_mask" in train_keys and "train/loss_keypoint" in train_keys
  for a, b in zip(four, one):
    assert a["step"] == b["step"]
    for k in b:
      if b[k] is None:  # COCOeval's "no such object"
        assert a[k] is None, k
      elif k.startswith("train/loss") or k.startswith("eval/") or k == "train/grad_norm":
        # Gloo's all-reduce sums in another order than one process's: float noise (worst
        # seen: loss_cls 4.7e-5, grad_norm 2.9e-5 relative); a wrong gather or a missing
        # shard is off by far more than this tolerance.
        rtol = 1e-3
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6, err_msg=k)
  assert len(four) == len(one)
  evals = [line for line in one if "eval/bbox/AP" in line]
  assert len(evals) == 1 and "eval/segm/AP" in evals[0] and "eval/keypoints/AP" in evals[0]
  assert four[-1]["train/step_compilations"] == 1
  assert (json.load(open(tmp_path / "four" / "eval_metrics.json"))
          == json.load(open(tmp_path / "one" / "eval_metrics.json")))
