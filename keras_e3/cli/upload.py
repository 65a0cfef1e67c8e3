"""`keras-e3 upload`: a preset directory -> the Hugging Face Hub."""

from keras_e3.presets.hub import upload_preset


def add_parser(commands):
    parser = commands.add_parser(
        "upload", help="upload a preset directory to the Hugging Face Hub")
    parser.add_argument("preset_dir")
    parser.add_argument("handle", help="hf://owner/repo[/branch]")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--message", help="commit message")


def run_command(args, parser):
    url = upload_preset(args.handle, args.preset_dir, private=args.private,
                        commit_message=args.message)
    print(f"uploaded {args.preset_dir} to {args.handle}: {url}")
