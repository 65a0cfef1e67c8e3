"""The `keras-e3` command line: one module per command, each with
`add_parser(commands)` and `run_command(args, parser)`."""

import argparse
import os
import sys

COMMANDS = ("demo", "convert", "upload", "export", "presets", "finetune",
            "predict", "evaluate")


def _modules():
    import importlib

    return {name: importlib.import_module(f"keras_e3.cli.{name}")
            for name in COMMANDS}


def _parser(modules):
    parser = argparse.ArgumentParser(
        prog="keras-e3", description="V-MoE and E³ models for Keras 3.")
    parser.add_argument("--backend", choices=("jax", "tensorflow", "torch"),
                        help="Keras backend (default: $KERAS_BACKEND)")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in modules.values():
        module.add_parser(commands)
    return parser


def main(argv=None):
    # The backend is chosen before the commands import Keras.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--backend")
    known, _ = early.parse_known_args(argv)
    if known.backend in ("jax", "tensorflow", "torch"):
        os.environ["KERAS_BACKEND"] = known.backend
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


if __name__ == "__main__":
    sys.exit(main())
