"""One module per ``moe-tune`` subcommand; each exposes ``configure(parser)`` and ``run(args)``."""
