"""The ``nag`` command's old module (``python -m nag_lightning.cli``, scripts of earlier installs):
the command now lives in ``nag_lightning.commands.main``."""

from nag_lightning.commands.main import COMMANDS, build_parser, main, usage  # noqa: F401

if __name__ == "__main__":
    main()
