"""`alignkit <command>`: one subcommand per pipeline stage, options from the stage's config dataclass."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
import warnings
from typing import get_origin, get_type_hints

from alignkit import __version__
from alignkit.commands import COMMANDS, load_target
from alignkit.config import add_config_arguments, config_from_args, to_dict
from alignkit.errors import AlignkitError
from alignkit.pipeline.registry import recorded


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description="The post-training pipeline of a language model.")
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in COMMANDS.items():
        sub = subparsers.add_parser(name, help=spec.help, description=spec.help)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of errors")
        # Only the chosen command's config is imported: `alignkit --help` stays fast.
        if name == command:
            if spec.actions:
                # Optional, so `--action X` (and `action:` in a YAML file) still work; the config checks the word.
                sub.add_argument("action", nargs="?", default=argparse.SUPPRESS, metavar="{" + ",".join(spec.actions) + "}")
            config_class = load_target(spec.target)[0]
            if spec.positional:
                many = get_origin(get_type_hints(config_class)[spec.positional]) is list
                sub.add_argument(spec.positional, nargs="*" if many else "?", default=argparse.SUPPRESS, metavar=spec.positional.upper())
            add_config_arguments(sub, config_class)
    return parser


def quiet_libraries() -> None:
    """Our own progress bar and messages are enough; silence the libraries' per-file bars and notices."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` on every LoRA model: not the user's to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    spec = COMMANDS.get(args.command) if args.command else None
    if extra:
        # argparse stops filling a positional list at the first flag; words after flags land here.
        if spec is None or not isinstance(getattr(args, spec.positional, []), list) or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, spec.positional, [*getattr(args, spec.positional, []), *extra])
    if args.command is None:
        parser.print_help()
        return 2
    assert spec is not None
    debug = args.debug or os.environ.get("ALIGNKIT_DEBUG") == "1"
    if args.command != "runs":  # listing the registry needs no model library; it stays fast without them
        quiet_libraries()
    try:
        config_class, run = load_target(spec.target)
        config = config_from_args(config_class, args)
        if spec.recorded:
            output = getattr(config, "output", "") or getattr(config, "out", "")
            with recorded("command", args.command, shlex.join(["alignkit", *argv]), output, to_dict(config)):
                run(config)
        else:
            run(config)
    except AlignkitError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc.render()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in alignkit, not in the user's input
        if debug:
            traceback.print_exc()
        print(
            f"internal error: {type(exc).__name__}: {exc}\n  -> rerun with --debug for the traceback and report it",
            file=sys.stderr,
        )
        return 1
    return 0
