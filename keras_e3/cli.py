"""The `keras-e3` command line."""

import argparse
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="keras-e3", description="V-MoE and E³ models for Keras 3.")
    parser.add_argument("--backend", choices=("jax", "tensorflow", "torch"),
                        help="Keras backend (default: $KERAS_BACKEND)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="an E³ classifies an image; prints each member's and "
                     "the ensemble's prediction")
    demo.add_argument("--image", help="image file (default: a synthetic one)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    if args.command == "demo":
        if args.image and not os.path.isfile(args.image):
            parser.exit(2, f"keras-e3 demo: no such image file: {args.image}\n")
        from keras_e3 import demo as demo_module

        demo_module.run(args.image, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
