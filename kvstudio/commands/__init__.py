"""CLI subcommands that live in their own module: each exposes `add_parser(subparsers)` and `run(args) -> int`."""
