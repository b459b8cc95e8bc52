"""config/README.md, generated from the schema so that it cannot drift: every key with its type, default
and description.

    python -m gem3d.config_doc            # rewrite config/README.md
    python -m gem3d.config_doc --check    # exit 1 when config/README.md is not what the schema gives

Types and descriptions come from gem3d/config.schema.yaml, defaults from the dataclasses of
gem3d/config.py (and, for the `model`/`train` sections whose keys override defaults one by one, from
the network and training dataclasses they are handed to). A schema key without a description is an
error here, so a new key cannot go undocumented.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from gem3d.config import SCHEMA_PATH, PhantomConfig, _schema, config_from_dict
from gem3d.io import atomic_path

README = Path(__file__).resolve().parents[1] / "config" / "README.md"
REQUIRED = object()  # marks a key without a default
MINIMAL = {"name": "x", "data": {"format": "folder", "path": ".", "labels": {"background": 0, "a": 1}}}

HEADER = """# Config keys

Every key of a gem3d config file (`config/*.yaml`), with its type, its default (the paper's setting)
and what it does. Unknown keys, wrong types and values that cannot work are refused when the config
loads, in one line naming the key. A relative path is relative to the working directory gem3d runs in.

This file is generated from `gem3d/config.schema.yaml` by `python -m gem3d.config_doc`; edit the
schema's `description:` entries, not this file.
"""


def _resolve(node: dict) -> dict:
    """A schema node with its `$ref` merged in (the node's own keys win, e.g. its description)."""
    if "$ref" not in node:
        return node
    target = _schema()
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return {**_resolve(target), **{k: v for k, v in node.items() if k != "$ref"}}


def _bounds(node: dict) -> str:
    parts = [f"{op} {node[key]}" for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                 ("maximum", "<="), ("exclusiveMaximum", "<")) if key in node]
    return f" {', '.join(parts)}" if parts else ""


def type_text(node: dict) -> str:
    """A schema node's type in words, e.g. `integer >= 1`, `list of 3 integer >= 4`, `brats | msd`."""
    node = _resolve(node)
    if "enum" in node:
        return " | ".join(json.dumps(v) if not isinstance(v, str) else v for v in node["enum"])
    if "const" in node:
        return f"always {node['const']}"
    kinds = node.get("type", "any")
    kinds = [k for k in kinds if k != "null"] + ["null"] * ("null" in kinds) if isinstance(kinds, list) else [kinds]
    text = " or ".join(kinds)
    if "array" in kinds:
        items = _resolve(node.get("items", {}))
        count = node.get("minItems") if node.get("minItems") == node.get("maxItems") else None
        what = f"values in {{{', '.join(map(str, items['enum']))}}}" if "enum" in items else type_text(items)
        text = f"list of {f'{count} ' if count else ''}{what}"
        if "maxItems" in node and count is None:
            text += f", at most {node['maxItems']}"
        if node.get("uniqueItems"):
            text += ", no repeats"
        return text
    if "object" in kinds and isinstance(node.get("additionalProperties"), dict):
        return f"mapping name -> {type_text(node['additionalProperties'])}"
    if "pattern" in node:
        text += f" matching `{node['pattern']}`"
    return text + _bounds(node)


def _section_defaults(path: str) -> dict:
    """Defaults of the keys of a `model`/`train` section that the config's own default leaves out."""
    from gem3d.models.unet import UNetConfig
    from gem3d.models.vae import VAEConfig
    from gem3d.training.train_config import TrainConfig

    cls = VAEConfig if path == "vae.model" else UNetConfig if path.endswith(".model") else TrainConfig
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def default_of(path: str, defaults: Any) -> Any:
    """The default value at a dotted path of the default config (REQUIRED where there is none)."""
    value: Any = defaults
    parts = path.split(".")
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(value):
            value = getattr(value, part, REQUIRED)
        elif isinstance(value, dict):
            section = ".".join(parts[:i])
            if part not in value and section.rsplit(".", 1)[-1] in ("model", "train", "stage1", "stage2"):
                if part == "seed":
                    return "the top-level seed"
                value = _section_defaults(section).get(part, REQUIRED)
            else:
                value = value.get(part, REQUIRED)
        else:
            return REQUIRED
    return value


def _default_text(path: str, value: Any) -> str:
    if path in ("name", "data", "data.format", "data.path", "data.labels"):
        return "required"
    if value is REQUIRED:
        return "-"
    if isinstance(value, str) and value.startswith("the top-level"):
        return value
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def _is_section(node: dict) -> bool:
    """A closed mapping of named keys (documented key by key), not a free mapping like data.labels."""
    return "properties" in node and node.get("additionalProperties") is False


def _cell(text: str, code: bool = False) -> str:
    """A Markdown table cell: `|` escaped, and `<` outside code spans (it would start an HTML tag)."""
    text = text.replace("|", "\\|")
    return f"`{text}`" if code else text.replace("<", "&lt;")


def _described(node: dict, path: str) -> str:
    if "description" not in node:
        raise ValueError(f"{SCHEMA_PATH}: {path} has no description")
    return node["description"]


def rows(node: dict, prefix: str, defaults: Any) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every key under a schema node, depth first."""
    out = []
    for key, child in _resolve(node).get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        child = _resolve(child)
        section = _is_section(child)
        default = "(section)" if section else _default_text(path, default_of(path, defaults))
        out.append((path, "section" if section else type_text(child), default, _described(child, path)))
        if "properties" in child:
            out += rows(child, path, defaults)
        extra = child.get("additionalProperties")
        if isinstance(extra, dict) and "properties" in extra:  # e.g. sampling.sets.<name>.informed
            for sub, sub_node in extra["properties"].items():
                sub_node = _resolve(sub_node)
                sub_path = f"{path}.<name>.{sub}"
                out.append((sub_path, type_text(sub_node), "required" if sub in extra.get("required", []) else "-",
                            _described(sub_node, sub_path)))
    return out


def _table(title: str, table: list[tuple[str, str, str, str]]) -> list[str]:
    return [f"## {title}\n", "| key | type | default | description |", "|---|---|---|---|",
            *(f"| {_cell(k, code=True)} | {_cell(t)} | {_cell(d)} | {_cell(desc)} |" for k, t, d, desc in table), ""]


def render() -> str:
    """The text of config/README.md."""
    defaults = config_from_dict(MINIMAL, source="defaults", check_paths=False)
    schema = _schema()
    top = {k: v for k, v in schema["properties"].items() if "properties" not in _resolve(v)}
    lines = [HEADER, *_table("Top level", rows({"properties": top}, "", defaults))]
    for key, node in schema["properties"].items():
        if key in top:
            continue
        node = _resolve(node)
        # phantoms is null by default; its keys' defaults are those of a phantoms section given empty
        section_defaults = dataclasses.replace(defaults, phantoms=PhantomConfig()) if key == "phantoms" else defaults
        head = (key, "section, or null" if "null" in node.get("type", []) else "section",
                _default_text(key, default_of(key, defaults)), _described(node, key))
        lines += _table(f"`{key}`", [head, *rows(node, key, section_defaults)])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gem3d.config_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if config/README.md differs from the schema")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        same = README.is_file() and README.read_text() == text
        print(f"{README}: {'up to date' if same else 'differs from the schema; run python -m gem3d.config_doc'}")
        return 0 if same else 1
    with atomic_path(README) as tmp:
        tmp.write_text(text)
    print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
