"""Train SwiftFormer: `python main.py --config=configs/s.py --workdir=DIR [--config.KEY=VALUE ...]`.

Multi-host: pass --coordinator_address, --num_processes and --process_id to every process, or run
under a launcher JAX detects by itself (SLURM, Open MPI, GKE), or pass --distributed on every
worker of a Cloud TPU VM slice; a plain single-host run starts no distributed runtime. Only
process 0 logs progress and writes metrics; every process takes part in the compiled steps and in
orbax's saves and restores.
"""

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and metrics.jsonl go here.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host without auto-detection).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host without auto-detection).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host without auto-detection).")
flags.DEFINE_bool("verbose", False, "Also print the INFO lines of orbax, absl, JAX and TensorFlow.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with JAX's auto-detection (Cloud TPU VMs, "
                  "where no environment variable announces the other hosts).")
flags.mark_flags_as_required(["config", "workdir"])

# Environment variables set by launchers JAX can read its coordinator, process count and index
# from (jax._src.clusters): only then is auto-detection attempted.
_MULTI_PROCESS_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # set by hand or by a k8s JobSet
    "SLURM_STEP_NODELIST",  # srun
    "OMPI_MCA_orte_hnp_uri",  # Open MPI's mpirun
    "TPU_WORKER_HOSTNAMES",  # Cloud TPU on GKE
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
)


def _initialize_distributed() -> None:
    import jax

    explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
        if FLAGS.distributed:
            raise app.UsageError("--distributed auto-detects the processes: do not also give --coordinator_address etc.")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed or any(os.environ.get(name) for name in _MULTI_PROCESS_ENV):
        jax.distributed.initialize()  # JAX finds the coordinator, process count and index itself


def _parse_flags(argv):
    """absl's flag parsing, with a one-line message for a --config.KEY the config does not have."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        sys.stderr.write(f"FATAL Flags parsing error: {error}\nPass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)
    except (AttributeError, KeyError) as error:  # config_flags applies overrides while parsing
        text = str(error).replace("\\n", " ").replace("\\'", "'").replace('\\"', '"')
        names = re.findall(r"'(\w+)'", text)
        hint = re.search(r'Did you mean "(\w+)"', text)
        overrides = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")]
        culprit = next((a for a in overrides if names and a.endswith("." + names[0])), "a --config.KEY override")
        suggestion = f' (did you mean "{hint.group(1)}"?)' if hint else ""
        sys.stderr.write(
            f"FATAL Flags parsing error: {culprit}: the config has no such key{suggestion}. Every key "
            "is listed, with a comment, in configs/default.py.\n"
        )
        sys.exit(1)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from swiftformer_jax import logs, xla_flags

    logs.setup(verbose=FLAGS.verbose)  # before TensorFlow is imported
    xla_flags.apply()  # XLA:CPU settings (a no-op elsewhere); before JAX starts its backend
    _initialize_distributed()

    import jax

    from swiftformer_jax import train

    if not FLAGS.verbose:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()  # the first run's data set preparation, as progress bars

    devices = sorted({d.device_kind for d in jax.local_devices()})
    logs.log.info("JAX %s, process %d of %d; %d local / %d global devices (%s)", jax.__version__,
                  jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                  ", ".join(devices))
    if jax.process_index() != 0:  # one progress log per job: process 0's; others report only trouble
        logs.log.info("Process %d logs warnings and errors only from here on.", jax.process_index())
        logs.setup(verbose=FLAGS.verbose, quiet=True)
    from swiftformer_jax import checkpoint, input_pipeline

    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (train.ConfigError, train.NonFiniteLossError, checkpoint.CheckpointWriteError,
            input_pipeline.UnreadableImageError, FileNotFoundError) as error:
        # Problems with a message for the user: one line each, no traceback.
        logs.log.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
