"""CLI subcommands, one module each, exposing `add_parser(subparsers)` and `run(args) -> int`."""
