"""Placeholder until the commands land."""

import click


def register(group: click.Group) -> None:
    """Add this module's commands to the root group."""
