"""Placeholder: filled in by the work on issue 8."""


def add_subcommands(sub):
    pass
