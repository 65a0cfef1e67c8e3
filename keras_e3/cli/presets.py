"""`keras-e3 presets`: the built-in presets."""

from keras_e3.presets import builtin


def add_parser(commands):
    parser = commands.add_parser("presets", help="list built-in presets")
    parser.add_argument("--verbose", "-v", action="store_true")


def run_command(args, parser):
    for name, card in builtin.builtin_presets().items():
        line = f"{name}  [{card['kind']}]"
        if args.verbose:
            line += f"  {card['description']}"
        print(line)
