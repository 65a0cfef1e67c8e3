"""The `keras-e3` console script.

A module outside the `keras_e3` package: importing `keras_e3` imports
Keras, whose backend is fixed at import, so `--backend` is read here and
KERAS_BACKEND set before `keras_e3.cli` is imported.

    keras-e3 --backend jax demo
    python -m keras_e3_launcher --backend jax demo   # the same
"""

import os
import sys

BACKENDS = ("jax", "tensorflow", "torch")


def requested_backend(argv):
    """The value of `--backend B` / `--backend=B` in `argv` (None if not
    given)."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return None


def main(argv=None):
    """Sets KERAS_BACKEND from `--backend`, then runs `keras_e3.cli.main`;
    returns its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    backend = requested_backend(argv)
    if backend in BACKENDS and "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = backend
    from keras_e3.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
