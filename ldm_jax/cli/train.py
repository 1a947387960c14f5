"""train.py's flags and work (`python train.py --help`): the config (ml_collections, with
one line for a missing file, an unknown preset or key), an optional jax.distributed start,
then `ldm_jax.train.run`; a preemption saves and exits 0."""

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from ldm_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (optionally `file.py:preset`).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
flags.DEFINE_bool("distributed", False, "Initialise jax.distributed (implied by "
                  "--coordinator_address); without addresses the cluster is auto-detected.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_string("local_device_ids", None, "Comma-separated local device ids this process "
                    "uses (e.g. one GPU per process).")
flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds after which a silent peer counts as "
                     "dead and the other processes stop with an error.")
flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for all processes to "
                     "join.")
flags.DEFINE_bool("allow_config_change", False, "Train an existing workdir with a config that "
                  "differs from its config.json in keys that may not change on resume (the old "
                  "file is kept as config.previous-<UTC time>.json).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.start(argv, FLAGS.verbosity)
  from ldm_jax import distributed
  from ldm_jax.errors import UserError
  from ldm_jax.train.run import run
  try:
    if FLAGS.distributed or FLAGS.coordinator_address:
      distributed.initialize(
          coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
          process_id=FLAGS.process_id, local_device_ids=FLAGS.local_device_ids,
          heartbeat_timeout=FLAGS.heartbeat_timeout,
          initialization_timeout=FLAGS.initialization_timeout)
    distributed.install_preemption_watch()
    run(FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
  except UserError as e:
    sys.exit(f"error: {e}")
  except distributed.Preempted as e:
    logging.warning("%s", e)
    distributed.exit_after_preemption()


def parse_flags(argv):
  """absl's parser, with one line instead of a traceback for a config file that does not exist,
  an unknown preset (`configs/ldm.py:nope`, the config file's UserError listing its presets)
  and an override of a key the config lacks (`--config.train.nope=1`, naming its nearest valid
  keys)."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg[len("--config="):].split(":", 1)[0]
      if not os.path.isfile(path):
        sys.exit(f"error: --config={path}: no such file")
  try:
    return FLAGS(argv)
  except flags.IllegalFlagValueError as e:
    from ldm_jax.errors import UserError
    cause = _innermost(e, UserError)
    if cause is None:
      raise
    sys.exit(f"error: {cause}")
  except (AttributeError, KeyError):
    from ldm_jax.train.checks import unknown_key_message
    config = FLAGS["config"].value
    if config is None:  # the overrides failed before the flag kept its value: load it again
      paths = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
      config = FLAGS["config"].parser.parse(paths[-1]) if paths else None
    for arg in argv[1:]:
      if arg.startswith("--config."):
        dotted = arg[len("--config."):].split("=", 1)[0]
        node = config
        try:
          for part in dotted.split("."):
            node = node[part]
        except (KeyError, AttributeError, TypeError):
          sys.exit(f"error: {unknown_key_message(config, dotted)}")
    raise


def _innermost(error: BaseException, kind: type) -> BaseException | None:
  """The first-raised exception of type `kind` in `error`'s cause / context chain (absl and
  ml_collections re-raise a config file's error wrapped twice, the traceback in the message)."""
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, kind):
      found = error
    error = error.__cause__ or error.__context__
  return found

