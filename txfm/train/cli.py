"""Command-line registration (filled in by this subpackage's issue)."""


def register(subparsers) -> None:
    pass
