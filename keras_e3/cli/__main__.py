"""`python -m keras_e3.cli`: the same as the `keras-e3` command.

Python imports the `keras_e3` package (hence Keras) before running this
module, so a `--backend` other than the one Keras was loaded with is
honoured by running the command again in a fresh interpreter through
`keras_e3_launcher`, which sets KERAS_BACKEND before Keras is imported.
"""

import os
import subprocess
import sys

from keras_e3.cli import BACKENDS
from keras_e3.cli import _loaded_backend
from keras_e3.cli import main
from keras_e3.cli import requested_backend

argv = sys.argv[1:]
backend = requested_backend(argv)
if backend in BACKENDS and _loaded_backend() not in (None, backend):
    env = dict(os.environ, KERAS_BACKEND=backend)
    sys.exit(subprocess.run([sys.executable, "-m", "keras_e3.cli", *argv],
                            env=env).returncode)
sys.exit(main(argv))
