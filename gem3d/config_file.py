"""Reading a config file: one line naming the file, line and column for anything that is not YAML.

`read_config_file` refuses a folder, a binary file (a checkpoint given by mistake), invalid YAML
(keeping the line and column of the problem), a key given twice in one mapping (PyYAML would keep
the last one silently) and an empty file. gem3d.config validates what it returns.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from gem3d.io import InputError


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, stricter about what a config means.

    A key given twice in one mapping is an error naming its dotted path and both lines (plain
    PyYAML keeps the last one silently), and `1e-4` is read as a number (YAML 1.2; PyYAML's YAML
    1.1 rules read it as a string, which the schema would then refuse with a puzzling message).
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicate_keys(node, "", set())
        return super().construct_document(node)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _refuse_duplicate_keys(node: yaml.Node, where: str, seen_nodes: set[int]) -> None:
    if id(node) in seen_nodes:  # an alias seen before (possibly recursive)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            dotted = f"{where}.{key}" if where else str(key)
            if key is not None and key != "<<":
                if key in first_line:
                    raise yaml.MarkedYAMLError(problem=f"duplicate key {dotted} (first given at line "
                                                       f"{first_line[key] + 1})", problem_mark=key_node.start_mark)
                first_line[key] = key_node.start_mark.line
            _refuse_duplicate_keys(value_node, dotted, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{where}.{i}", seen_nodes)


def read_config_file(path: Path) -> Any:
    """The YAML content of a config file; InputError (one line, with line and column) otherwise."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a config file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the config file ({exc.strerror})") from None
    try:
        if b"\0" in data:
            raise UnicodeError
        text = data.decode("utf-8")
    except UnicodeError:
        raise InputError(f"{path}: a binary file, not a YAML config file") from None
    try:
        raw = yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = ""
        if exc.context and exc.context_mark is not None and exc.problem_mark is not None:
            context = (f" ({exc.context} at line {exc.context_mark.line + 1}, "
                       f"column {exc.context_mark.column + 1})")
        raise InputError(f"{path}: invalid YAML{where}: {exc.problem or exc.context}{context}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        raise InputError(f"{path}: the config file is empty")
    return raw
