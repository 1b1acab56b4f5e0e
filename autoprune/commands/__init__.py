"""CLI subcommands: one module per subcommand, each exposing ``add_parser(subparsers)`` and ``run(args) -> int``."""
