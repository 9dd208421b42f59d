"""YAML as people write it: `5e-6` is a number.

PyYAML reads YAML 1.1, whose floats need a dot (`5.0e-6`): it takes `learning_rate: 5e-6`, the way the
DreamBooth paper and everyone write it, for the string "5e-6". YAML 1.2 reads a number, and so does this loader.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    """Like yaml.safe_load, with exponents without a dot read as floats."""
    return yaml.load(text, Loader=_Loader)
