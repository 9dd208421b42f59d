"""YAML as people write it: `5e-6` is a number, `0400` is 400, and a key written twice is a mistake.

PyYAML reads YAML 1.1, whose floats need a dot (`5.0e-6`): it takes `learning_rate: 5e-6`, the way the
DreamBooth paper and everyone write it, for the string "5e-6". YAML 1.2 reads a number, and so does this loader.
YAML 1.1 also reads `max_steps: 0400` as octal (256) and `1:30` as base 60 (90); YAML 1.2 has neither, and this
loader reads its integers: decimal with or without leading zeros, `0o17` octal, `0x1f` hex (and, as PyYAML does,
`0b101` binary and `_` between digits). `1:30` is a string (YAML 1.1's base-60 floats, `1:30.5`, are still read).

PyYAML keeps the last of a key written twice; this loader refuses the mapping, naming the key and its lines. It also
refuses, as YAMLErrors, what PyYAML raised other errors for: a scalar its tag cannot take (a 13th month, an integer
of more digits than Python reads; with its line) and nesting deeper than Python's recursion limit.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import yaml
from yaml.constructor import ConstructorError

_INT = "tag:yaml.org,2002:int"
_MERGE = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    # YAML 1.1's integers left out; YAML 1.2's are added below.
    yaml_implicit_resolvers: ClassVar[dict[str | None, list[tuple[str, re.Pattern]]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _INT]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        # Checked as written, before `<<` merges: a key given here overrides a merged one, as merging means to.
        node = super().compose_mapping_node(anchor)
        first_marks: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE:
                key = self.construct_object(key_node)
                if key in first_marks:
                    problem = f"found duplicate key {key!r} (first at line {first_marks[key].line + 1})"
                    raise ConstructorError(None, None, problem, key_node.start_mark)
                first_marks[key] = key_node.start_mark
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ValueError as e:  # from int(), float(), datetime.date() on a scalar's text; the mark quotes it
            raise ConstructorError(None, None, f"cannot read the value: {e}", node.start_mark) from e


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    value = int(text, {"0x": 16, "0o": 8, "0b": 2}.get(text.lstrip("+-")[:2], 10))
    # Python refuses to read a decimal integer of over 4300 digits (the conversion takes quadratic time), and to print
    # one; hex it reads at any length, and the first message to print the value would raise: refused here instead.
    str(value)
    return value


_Loader.add_implicit_resolver(
    _INT, re.compile(r"^[-+]?(?:[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+|0b[01_]+)$"), list("-+0123456789")
)
_Loader.add_constructor(_INT, _construct_int)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def error_without_text(error: yaml.YAMLError) -> str:
    """What is wrong and where (line, column), without the snippet of the document PyYAML's message quotes: in a file
    of secrets (a controller's tenants and their tokens) that snippet is one, and the message goes to logs."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = [part for part in (getattr(error, "context", None), getattr(error, "problem", None)) if part]
    return where + ("; ".join(what) if what else type(error).__name__)


def load_yaml(text: str) -> Any:
    """Like yaml.safe_load, reading numbers as YAML 1.2 does and refusing duplicate keys; every error a YAMLError."""
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError as e:
        raise yaml.YAMLError(f"nested too deeply: {e}") from e
