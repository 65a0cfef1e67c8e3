"""The `keras-e3` command line."""

import argparse
import json
import os
import sys


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-e3", description="V-MoE and E³ models for Keras 3.")
    parser.add_argument("--backend", choices=("jax", "tensorflow", "torch"),
                        help="Keras backend (default: $KERAS_BACKEND)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="the shipped E³ on held-out digits: accuracy, NLL and "
                     "ECE per member and for the ensemble (offline)")
    demo.add_argument("--preset", default="e3_tiny_digits")
    demo.add_argument("--image", help="also classify this image file")
    convert = commands.add_parser(
        "convert", help="official vmoe config + checkpoint -> preset dir")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a built-in vmoe_checkpoint preset")
    source.add_argument("--config", help="vmoe model config (JSON file)")
    convert.add_argument("--checkpoint",
                         help="native checkpoint prefix (path, https:// or "
                              "gs://) or .npz of official parameter names")
    convert.add_argument("--image-size", type=int)
    convert.add_argument("--out", required=True, help="preset directory")
    upload = commands.add_parser(
        "upload", help="upload a preset directory to the Hugging Face Hub")
    upload.add_argument("preset_dir")
    upload.add_argument("handle", help="hf://owner/repo[/branch]")
    upload.add_argument("--private", action="store_true")
    upload.add_argument("--message", help="commit message")
    export = commands.add_parser(
        "export", help="export a preset for serving without keras_e3 "
                       "(TensorFlow SavedModel, ONNX or LiteRT)")
    export.add_argument("preset")
    export.add_argument("out", help="SavedModel directory, .onnx or "
                                    ".tflite file (written atomically)")
    export.add_argument("--format", default="saved_model",
                        choices=("saved_model", "onnx", "litert"))
    export.add_argument("--include-preprocessing", action="store_true",
                        help="serve raw uint8 images with the preset's "
                             "preprocessing; output member logits and "
                             "ensemble probabilities")
    presets = commands.add_parser("presets", help="list built-in presets")
    presets.add_argument("--verbose", "-v", action="store_true")
    finetune = commands.add_parser(
        "finetune", help="fine-tune a preset on a dataset (optionally "
                         "k-shot) and write a new preset")
    finetune.add_argument("--preset", required=True)
    finetune.add_argument("--data", required=True,
                          help="'digits' or a folder of class sub-folders")
    finetune.add_argument("--shots", type=int,
                          help="k examples per class (default: all)")
    finetune.add_argument("--epochs", type=int, default=10)
    finetune.add_argument("--batch-size", type=int, default=32)
    finetune.add_argument("--learning-rate", type=float, default=0.01)
    finetune.add_argument("--optimizer", default="sgd",
                          choices=("sgd", "adam", "adamw"))
    finetune.add_argument("--train", default="all",
                          choices=("all", "head", "all_but_experts"))
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--out", required=True, help="preset directory")
    predict = commands.add_parser(
        "predict", help="top-k classes of image files, with ensemble "
                        "probabilities and member disagreement")
    predict.add_argument("--preset", required=True)
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--json", action="store_true",
                         help="print JSON instead of text")
    predict.add_argument("images", nargs="+")
    evaluate = commands.add_parser(
        "evaluate", help="accuracy, NLL, ECE, Brier, OOD detection and "
                         "FLOPs per member and ensemble; a JSON report and "
                         "plots")
    from keras_e3 import evaluate as evaluate_module

    evaluate_module.add_arguments(evaluate)
    return parser


def _convert(args, parser):
    from keras_e3 import registry

    if args.preset:
        card = registry.builtin_presets().get(args.preset)
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
    model = registry.convert_checkpoint(config, checkpoint, args.out,
                                        image_size=image_size)
    print(f"wrote {args.out} ({model.count_params():,} parameters)")


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    from keras_e3.conversion.vmoe import VmoeConversionError
    from keras_e3.conversion.vmoe_checkpoint import VmoeCheckpointError
    from keras_e3.preset_io import PresetError

    try:
        if args.command == "demo":
            if args.image and not os.path.isfile(args.image):
                parser.exit(2, f"keras-e3 demo: no such image file: "
                               f"{args.image}\n")
            from keras_e3 import demo as demo_module

            demo_module.run(args.image, preset=args.preset)
        elif args.command == "convert":
            _convert(args, parser)
        elif args.command == "upload":
            from keras_e3.hub import upload_preset

            url = upload_preset(args.handle, args.preset_dir,
                                private=args.private,
                                commit_message=args.message)
            print(f"uploaded {args.preset_dir} to {args.handle}: {url}")
        elif args.command == "finetune":
            from keras_e3.finetune import finetune

            try:
                summary = finetune(
                    args.preset, args.data, args.out, shots=args.shots,
                    epochs=args.epochs, batch_size=args.batch_size,
                    learning_rate=args.learning_rate,
                    optimizer=args.optimizer, train=args.train,
                    seed=args.seed)
            except KeyboardInterrupt:
                parser.exit(130, f"keras-e3 finetune: interrupted; "
                                 f"{args.out} was not changed\n")
            print(json.dumps({k: summary[k] for k in summary
                              if k != "history"}, indent=2))
            print(f"wrote {args.out}")
        elif args.command == "predict":
            from keras_e3.finetune import format_predictions
            from keras_e3.finetune import predict

            results = predict(args.preset, args.images, top_k=args.top_k)
            print(json.dumps(results, indent=2) if args.json
                  else format_predictions(results))
        elif args.command == "evaluate":
            from keras_e3 import evaluate as evaluate_module

            return evaluate_module.run(args)
        elif args.command == "export":
            from keras_e3.export import export_preset

            path = export_preset(
                args.preset, args.out, args.format,
                include_preprocessing=args.include_preprocessing)
            print(f"wrote {path}")
        elif args.command == "presets":
            from keras_e3 import registry

            for name, card in registry.builtin_presets().items():
                line = f"{name}  [{card['kind']}]"
                if args.verbose:
                    line += f"  {card['description']}"
                print(line)
    except (PresetError, VmoeConversionError, VmoeCheckpointError,
            ValueError) as e:
        parser.exit(1, f"keras-e3 {args.command}: {e}\n")
    except ImportError as e:  # an optional dependency, named with its fix
        if "pip install" not in str(e):
            raise
        parser.exit(1, f"keras-e3 {args.command}: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
