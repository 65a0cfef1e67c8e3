"""The `keras-e3` command line: one module per command, each with
`add_parser(commands)` and `run_command(args, parser)`.

The console script is `keras_e3_launcher:main` (a module outside this
package), which sets KERAS_BACKEND from `--backend` before anything
imports Keras, then calls `main` here.
"""

import argparse
import os
import sys

BACKENDS = ("jax", "tensorflow", "torch")
COMMANDS = ("demo", "convert", "upload", "export", "presets", "upcycle",
            "finetune", "predict", "evaluate")


def _modules():
    import importlib

    return {name: importlib.import_module(f"keras_e3.cli.{name}")
            for name in COMMANDS}


def _parser(modules):
    parser = argparse.ArgumentParser(
        prog="keras-e3", description="V-MoE and E³ models for Keras 3.")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="Keras backend (default: $KERAS_BACKEND)")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in modules.values():
        module.add_parser(commands)
    return parser


def requested_backend(argv):
    """The --backend of a command line (None if not given)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--backend")
    known, _ = early.parse_known_args(argv)
    return known.backend


def main(argv=None):
    """Runs the `keras-e3` command line `argv` (default: sys.argv[1:]);
    returns the exit status.

    `--backend` must be chosen before Keras is imported: the `keras-e3`
    console script (`keras_e3_launcher`) sets KERAS_BACKEND first. Called
    in a process where Keras is already loaded with another backend,
    `--backend` is an error (exit status 2) rather than ignored.
    """
    backend = requested_backend(argv)
    if backend in BACKENDS:
        loaded = _loaded_backend()
        if loaded is not None and loaded != backend:
            sys.stderr.write(
                f"keras-e3: --backend {backend}: Keras is already loaded "
                f"with the {loaded} backend in this process, and its "
                "backend cannot change once imported. Run the keras-e3 "
                "command (or python -m keras_e3_launcher), or set "
                f"KERAS_BACKEND={backend} before importing Keras.\n")
            return 2
        os.environ["KERAS_BACKEND"] = backend
    modules = _modules()
    parser = _parser(modules)
    args = parser.parse_args(argv)
    from keras_e3.conversion.vmoe import VmoeConversionError
    from keras_e3.conversion.vmoe_checkpoint import VmoeCheckpointError
    from keras_e3.presets import PresetError

    try:
        return modules[args.command].run_command(args, parser) or 0
    except (PresetError, VmoeConversionError, VmoeCheckpointError,
            ValueError) as e:
        parser.exit(1, f"keras-e3 {args.command}: {e}\n")
    except ImportError as e:  # an optional dependency, named with its fix
        if "pip install" not in str(e):
            raise
        parser.exit(1, f"keras-e3 {args.command}: {e}\n")


def _loaded_backend():
    """The backend of the Keras already imported in this process, or
    None."""
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    return keras.backend.backend()


if __name__ == "__main__":
    sys.exit(main())
