"""`keras-e3 export`: a preset as an artefact that serves without keras_e3
(see `keras_e3.export`)."""

from keras_e3.export import export_preset


def add_parser(commands):
    parser = commands.add_parser(
        "export", help="export a preset for serving without keras_e3 "
                       "(TensorFlow SavedModel, ONNX or LiteRT)")
    parser.add_argument("preset")
    parser.add_argument("out", help="SavedModel directory, .onnx or "
                                    ".tflite file (written atomically); "
                                    "its extension picks the format")
    parser.add_argument("--format", default=None,
                        choices=("saved_model", "onnx", "litert"),
                        help="the format (default: from OUT's extension: "
                             ".onnx -> onnx, .tflite -> litert, else "
                             "saved_model); must agree with OUT's name")
    parser.add_argument("--include-preprocessing", action="store_true",
                        help="serve raw uint8 images of any size [B, H, W, "
                             "C] (and, in a SavedModel, encoded image "
                             "files) through the preset's ImageConverter; "
                             "output member logits and ensemble "
                             "probabilities")


def run_command(args, parser):
    path = export_preset(args.preset, args.out, args.format,
                         include_preprocessing=args.include_preprocessing)
    print(f"wrote {path}")
