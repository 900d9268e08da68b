"""Two processes x two CPU devices train and validate together (what a TPU pod does), and the
checkpoint they wrote collectively loads and evaluates in this single process."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

from sccorr_jax import models
from sccorr_jax import config_lib

from sccorr_jax import checkpoint, evaluation


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_training_and_evaluation(tmp_path):
  workdir, data_dir = tmp_path / "run", tmp_path / "data"
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [
      subprocess.Popen(
          [
              sys.executable,
              str(ROOT / "tests" / "multihost_driver.py"),
              str(i),
              "2",
              str(port),
              str(workdir),
              str(data_dir),
          ],
          cwd=ROOT,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    assert f"process {i} of 2 with 4 devices: step 4" in out, out[-2000:]

  # Process 0 logged the validation; the checkpoint written by both processes loads here
  # (one process, four devices) against an abstract target.
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = [l for l in lines if "val/a/pck@0.1" in l][-1]
  variables, config = checkpoint.load_model_variables(
      workdir, model_index=0, step=int(logged["step"])
  )
  assert int(config.optim.batch_size) == 4
  # Evaluating model a here gives the number the two processes computed together (each
  # process held half of the validation pairs; the counts were gathered).
  cfg = config_lib.tiny_config("mt", data_dir=str(data_dir))
  model = models.build_model(cfg)
  from sccorr_jax import data  # pylint: disable=g-import-not-at-top

  it = data.create_eval_iterator(cfg.data, cfg.eval.split, batch_size=cfg.eval.batch_size)
  ours = evaluation.validation_metrics(
      model,
      variables,
      it,
      evaluation.Protocol.from_config(cfg, validation=True),
      max_batches=cfg.eval.max_batches,
  )
  np.testing.assert_allclose(ours["val/pck@0.1"], logged["val/a/pck@0.1"], atol=1e-6)
