"""Train ldm_jax models: python train.py --config=configs/ldm.py --workdir=runs/ldm

Re-running the same command on the same workdir resumes from the latest checkpoint.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (optionally `file.py:preset`).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ldm_jax import platform  # noqa: E402  (sets XLA flags before jax starts)
  platform.configure()
  platform.quiet_library_logs()
  from ldm_jax.errors import UserError
  from ldm_jax.train.run import run
  try:
    run(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
