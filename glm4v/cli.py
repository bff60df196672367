"""Command line: ``glm4v chat | serve | train | eval | bench``.

Each subcommand lives in the module of its concern and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together, so that ``glm4v --help`` stays cheap and
one broken optional dependency (e.g. the server's) does not take the other commands down.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from glm4v.errors import Glm4vError

COMMANDS = {
    "chat": ("glm4v.chat", "chat about an image (one-shot or interactive)"),
    "serve": ("glm4v.server", "OpenAI-compatible HTTP API and web chat page"),
    "train": ("glm4v.train.cli", "train or fine-tune (full or LoRA) on JSONL conversations"),
    "eval": ("glm4v.eval.cli", "evaluate on the model card's benchmarks or the synthetic test split"),
    "bench": ("glm4v.bench", "measure speed and memory against this machine's limits"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="glm4v", description="GLM-4V-9B runtime: chat, serve, train, eval, bench")
    parser.add_argument("--version", action="version", version=f"glm4v {__import__('glm4v').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            command.set_defaults(_unavailable=f"glm4v {name} is unavailable: {e}")
            continue
        module.add_arguments(command)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"error: {args._unavailable}", file=sys.stderr)
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except Glm4vError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
