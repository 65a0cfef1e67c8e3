"""`keras-e3 upcycle`: a dense ViT (a preset, or a vit_jax / big_vision
.npz) -> a V-MoE or E³ preset whose experts start as the dense MLPs
(`keras_e3.upcycle`, vmoe's initialize_from_vit).

    keras-e3 upcycle SOURCE OUT --experts 8 --moe-layers 5,7
        [--ensemble-size 2] [--top-k 1] [--capacity-factor 1.5]
        [--group-size N] [--router top_k|experts_choice|soft]
        [--num-slots S] [--image-size N] [--num-classes C] [--seed S]

`keras-e3 finetune --preset OUT ...` takes it from there.
"""


def add_parser(commands):
    parser = commands.add_parser(
        "upcycle", help="dense ViT (preset or .npz) -> V-MoE / E³ preset, "
                        "every expert a copy of the dense MLP")
    parser.add_argument("source", help="a dense preset (name, directory, "
                                       "hf://...) or a vit_jax .npz")
    parser.add_argument("out", help="the new preset directory")
    parser.add_argument("--experts", type=int, required=True,
                        help="experts per MoE block")
    parser.add_argument("--moe-layers", required=True,
                        help="comma-separated block indices, e.g. 5,7")
    parser.add_argument("--ensemble-size", type=int, default=1,
                        help="E³ members M (1: a V-MoE)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="experts per token (top-K routers)")
    parser.add_argument("--capacity-factor", type=float, default=None)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--router", default="top_k",
                        choices=("top_k", "experts_choice", "soft"))
    parser.add_argument("--num-slots", type=int, default=None,
                        help="Soft MoE slots per expert")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize first (position embeddings by vmoe's "
                             "vit_zoom)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="a fresh head with this many classes")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the fresh routers")


def parse_layers(text):
    """[5, 7] from "5,7"; a ValueError naming the problem."""
    try:
        layers = [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError as e:
        raise ValueError(f"--moe-layers must be comma-separated block "
                         f"indices, e.g. 5,7; got {text!r}.") from e
    if not layers:
        raise ValueError("--moe-layers names no block.")
    return layers


def run(args):
    """Upcycles `args.source` into `args.out`; returns the new model."""
    from keras_e3.models import E3ViT
    from keras_e3.models.upcycle import upcycle

    layers = parse_layers(args.moe_layers)
    overrides = {}
    if args.image_size:
        overrides["image_size"] = args.image_size
    if args.num_classes:
        overrides["num_classes"] = args.num_classes
    dense = E3ViT.from_preset(args.source, **overrides)
    settings = {}
    if args.num_slots is not None:
        settings["num_slots"] = args.num_slots
    model = upcycle(dense, num_experts=args.experts, moe_layers=layers,
                    num_selected_experts=args.top_k,
                    ensemble_size=args.ensemble_size,
                    capacity_factor=args.capacity_factor,
                    group_size=args.group_size, router=args.router,
                    seed=args.seed, **settings)
    model.save_to_preset(args.out, extra_metadata={"upcycled_from": {
        "source": str(args.source), "num_experts": args.experts,
        "moe_layers": layers, "ensemble_size": args.ensemble_size,
        "router": args.router}})
    return model


def run_command(args, parser):
    model = run(args)
    backbone = model.backbone
    print(f"wrote {args.out}: {backbone.num_experts} experts in blocks "
          f"{tuple(backbone.moe_layers)}, M={backbone.ensemble_size}, "
          f"{model.count_params():,} parameters")
