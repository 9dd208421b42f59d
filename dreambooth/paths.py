"""Paths as users write them: `~` and `~user` made home folders, as a shell makes them where it expands them (it
leaves `--storage=~/x` alone, and YAML files are never expanded): a folder literally named `~` was made instead."""

from __future__ import annotations

import argparse
from pathlib import Path

from dreambooth.errors import InputError


def expand_user(path: str | Path, field: str) -> Path:
    """`path` with a leading `~` or `~user` expanded; InputError naming `field` for a user this machine does not
    know (pathlib raises RuntimeError there)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise InputError(field, f"{path}: no home folder of that user on this machine") from None


def path_argument(text: str) -> Path:
    """An argparse type for a path option: expand_user, its error told as the option's."""
    try:
        return expand_user(text, "path")
    except InputError as e:
        raise argparse.ArgumentTypeError(e.message) from None
