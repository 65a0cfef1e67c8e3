"""`python -m keras_e3.cli`: the same as the `keras-e3` command."""

import sys

from keras_e3.cli import main

sys.exit(main())
