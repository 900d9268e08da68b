"""One process of a simulated multi-host run (tests/test_multihost.py starts two of them).

    python tests/multihost_driver.py PROCESS_ID NUM_PROCESSES PORT WORKDIR DATA_DIR

Each process has two CPU devices; the processes talk through gloo collectives on loopback.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"


def main():
  pid, nproc, port, workdir, data_dir = sys.argv[1:6]
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}", num_processes=int(nproc), process_id=int(pid)
  )
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.FLAGS.mark_as_parsed()
  from sccorr_jax import config_lib
  from sccorr_jax import train  # pylint: disable=g-import-not-at-top

  config = config_lib.tiny_config("mt", data_dir=data_dir)
  summary = train.train_and_evaluate(config, workdir)
  print(
      f"process {pid} of {jax.process_count()} with {jax.device_count()} devices: "
      f"step {summary['step']}",
      flush=True,
  )


if __name__ == "__main__":
  main()
