"""`keras-e3 finetune`: fine-tune a preset on a dataset (see
`keras_e3.training.finetune`) and write a new preset."""

import json

from keras_e3.training.fine_tuning import finetune
from keras_e3.training.recipe import OPTIMIZERS
from keras_e3.training.recipe import TRAIN_MODES


def add_parser(commands):
    parser = commands.add_parser(
        "finetune", help="fine-tune a preset on a dataset (optionally "
                         "k-shot) and write a new preset")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--data", required=True,
                        help="'digits' or a folder of class sub-folders")
    parser.add_argument("--shots", type=int,
                        help="k examples per class (default: all)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    parser.add_argument("--train", default="all", choices=TRAIN_MODES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="preset directory")


def run_command(args, parser):
    try:
        summary = finetune(
            args.preset, args.data, args.out, shots=args.shots,
            epochs=args.epochs, batch_size=args.batch_size,
            learning_rate=args.learning_rate, optimizer=args.optimizer,
            train=args.train, seed=args.seed)
    except KeyboardInterrupt:
        parser.exit(130, f"keras-e3 finetune: interrupted; {args.out} was "
                         "not changed\n")
    print(json.dumps({k: summary[k] for k in summary if k != "history"},
                     indent=2))
    print(f"wrote {args.out}")
