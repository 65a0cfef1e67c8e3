"""`keras-e3 convert`: an official vmoe config + checkpoint -> a preset."""

import os

from keras_e3.presets import builtin


def add_parser(commands):
    parser = commands.add_parser(
        "convert", help="official vmoe config + checkpoint -> preset dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a built-in vmoe_checkpoint preset")
    source.add_argument("--config", help="vmoe model config (JSON file)")
    parser.add_argument("--checkpoint",
                        help="native checkpoint prefix (path, https:// or "
                             "gs://), .npz of official parameter names, or "
                             "a vmoe trainer workdir / ckpt/<step> "
                             "directory (orbax; needs keras-e3[orbax])")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--out", required=True, help="preset directory")


def run_command(args, parser):
    if args.preset:
        card = builtin.builtin_presets().get(args.preset)
        if card is None or card["kind"] != "vmoe_checkpoint":
            parser.exit(2, f"keras-e3 convert: {args.preset!r} is not a "
                           "built-in preset with an official checkpoint\n")
        config, checkpoint = card["vmoe_config"], card["checkpoint"]
        image_size = args.image_size or card.get("image_size")
    else:
        if not os.path.isfile(args.config):
            parser.exit(2, f"keras-e3 convert: no such config file: "
                           f"{args.config}\n")
        if not args.checkpoint:
            parser.exit(2, "keras-e3 convert: --config needs --checkpoint\n")
        config, checkpoint, image_size = (args.config, args.checkpoint,
                                          args.image_size)
    model = builtin.convert_checkpoint(config, checkpoint, args.out,
                                       image_size=image_size)
    print(f"wrote {args.out} ({model.count_params():,} parameters)")
