"""Train ldm_jax models: python train.py --config=configs/ldm.py --workdir=runs/ldm

Re-running the same command on the same workdir resumes from the latest checkpoint.

Several processes (one per host) form one job with `--distributed` (cluster detected from the
environment: Cloud TPU, SLURM, Open MPI, Kubernetes) or with explicit
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`; see docs/DISTRIBUTED.md.
SIGTERM to any process saves a checkpoint at the same step on all of them and exits 0.
"""
from ldm_jax import console  # quiet TensorFlow before anything imports it

console.quiet_environment()

from absl import app  # noqa: E402

from ldm_jax.cli import train  # noqa: E402  (defines the flags)

if __name__ == "__main__":
  app.run(train.main, flags_parser=train.parse_flags)
