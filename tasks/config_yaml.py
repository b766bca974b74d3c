"""Reading a config file with limits: a hostile YAML file fails in one line naming the problem; it does not hang,
eat the memory or end in a RecursionError.

- The file: a regular file (not a directory, device or pipe) of at most :data:`MAX_CONFIG_BYTES`, UTF-8 text.
- Nesting: at most :data:`MAX_DEPTH` levels of mappings and lists (also counted through aliases).
- Anchors and aliases stay usable for reuse (``&base`` / ``<<: *base``), within limits: at most :data:`MAX_ALIASES`
  aliases per file, none naming a node that contains it (a recursive structure), and the document as expanded (each
  alias counted as a copy of what it names) at most :data:`MAX_EXPANDED_VALUES` values, checked while composing,
  before any copy is made: a "billion laughs" file is refused in milliseconds.
- Keys are strings, each once per mapping: a duplicate key is an error (YAML would keep the last silently), and so
  is a key that YAML 1.1 reads as another type (``on:``/``yes:`` are booleans, ``1:`` an integer, ``~:`` null).
- Values: strings, numbers, booleans, null, lists and mappings. The loader is a :class:`yaml.SafeLoader` subclass
  (no ``!!python/...`` constructors, never ``yaml.load`` with an unsafe loader); ``!!binary``, ``!!set``,
  ``!!omap``, ``!!pairs`` and ``!!timestamp`` are refused too, and dates stay strings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from tasks.config_errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: the largest shipped config is under 2 KiB
MAX_DEPTH = 32  # levels of mappings and lists
MAX_ALIASES = 100  # `*name` references per file
MAX_EXPANDED_VALUES = 1_000_000  # scalars, lists and mappings of the document with every alias expanded

_TAG = "tag:yaml.org,2002:"
_REFUSED_TAGS = tuple(_TAG + t for t in ("binary", "timestamp", "set", "omap", "pairs"))
_KEY_KINDS = {"bool": "a boolean", "int": "an integer", "float": "a number", "null": "null"}


class RefusedYaml(yaml.YAMLError):
    """Well-formed YAML that a config may not hold (past a limit, a duplicate or non-string key)."""

    def __init__(self, mark: yaml.Mark | None, where: str, message: str) -> None:
        super().__init__(message)
        self.mark, self.where, self.message = mark, where, message


class LimitedLoader(yaml.SafeLoader):
    """SafeLoader with the limits of the module docstring."""

    yaml_constructors = {k: v for k, v in yaml.SafeLoader.yaml_constructors.items() if k not in _REFUSED_TAGS}
    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in _REFUSED_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0
        self._path: list[str] = []
        self._open_anchors: set[str] = set()
        self._expanded: dict[int, tuple[int, int]] = {}  # id(node) -> (values when expanded, nesting when expanded)

    def _where(self, *more: str) -> str:
        return ".".join([*self._path, *more])

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise RefusedYaml(event.start_mark, self._where(), f"more than {MAX_ALIASES} YAML aliases (*name)")
            if event.anchor in self._open_anchors:
                raise RefusedYaml(
                    event.start_mark, self._where(), f"alias *{event.anchor} names a node that contains it (recursive)"
                )
            return super().compose_node(parent, index)
        event = self.peek_event()
        part = _path_part(parent, index)
        if part is not None:
            self._path.append(part)
        collection = isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent)
        self._depth += collection
        if self._depth > MAX_DEPTH:
            raise RefusedYaml(event.start_mark, "", f"nested deeper than {MAX_DEPTH} levels of lists and mappings")
        if event.anchor is not None:
            self._open_anchors.add(event.anchor)
        node = super().compose_node(parent, index)
        self._open_anchors.discard(event.anchor)
        self._depth -= collection
        self._check(node)
        if part is not None:
            self._path.pop()
        return node

    def _check(self, node: Node) -> None:
        """Keys of a mapping, and the size and nesting of the node with its aliases expanded (its children, aliases
        included, are composed already, so this is one look-up per child)."""
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            self._check_keys(node)
            children = [n for pair in node.value for n in pair]
        values = 1 + sum(self._expanded[id(c)][0] for c in children)
        depth = 1 + max((self._expanded[id(c)][1] for c in children), default=0) if children else 0
        if values > MAX_EXPANDED_VALUES:
            raise RefusedYaml(
                node.start_mark,
                self._where(),
                f"expands to more than {MAX_EXPANDED_VALUES} values through YAML aliases (a 'billion laughs' file?)",
            )
        if depth > MAX_DEPTH:
            raise RefusedYaml(node.start_mark, self._where(), f"nested deeper than {MAX_DEPTH} levels through aliases")
        self._expanded[id(node)] = (values, depth)

    def _check_keys(self, node: MappingNode) -> None:
        first_line: dict[str, int] = {}
        for key, _ in node.value:
            if key.tag == _TAG + "merge":
                continue
            if not isinstance(key, ScalarNode):
                kind = "a list" if isinstance(key, SequenceNode) else "a mapping"
                raise RefusedYaml(key.start_mark, self._where(), f"{kind} used as a key; keys must be strings")
            if key.tag != _TAG + "str":
                kind = _KEY_KINDS.get(key.tag.removeprefix(_TAG), key.tag)
                raise RefusedYaml(
                    key.start_mark,
                    self._where(),
                    f'key {key.value!r} reads as {kind}, not a string; quote it ("{key.value}") if it is a name',
                )
            if key.value in first_line:
                raise RefusedYaml(
                    key.start_mark, self._where(key.value), f"duplicate key (first at line {first_line[key.value]})"
                )
            first_line[key.value] = key.start_mark.line + 1

    def compose_document(self) -> Node:
        node = super().compose_document()
        self._expanded.clear()
        return node


def _path_part(parent: Node | None, index: Any) -> str | None:
    if isinstance(parent, MappingNode):
        return str(index.value) if isinstance(index, ScalarNode) else None  # None: composing a key
    if isinstance(parent, SequenceNode):
        return str(index)
    return None


def parse_yaml(text: str, source: str) -> Any:
    """The data of one YAML document, with the limits of the module docstring; ConfigError in one line."""
    loader = LimitedLoader(text)
    try:
        return loader.get_single_data()
    except RefusedYaml as e:
        line = f" line {e.mark.line + 1}:" if e.mark is not None else ""
        where = f" {e.where}:" if e.where else ""
        raise ConfigError(f"{source}:{line}{where} {e.message}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if problem.startswith("but ") and getattr(e, "context", None):  # "... a single document, but found another"
            problem = f"{e.context}, {problem}"
        raise ConfigError(f"{source}:{where} malformed YAML: {problem}") from None
    except RecursionError:  # a limit above should come first; never a traceback
        raise ConfigError(f"{source}: nested too deeply") from None
    finally:
        loader.dispose()


def read_config_file(path: str | os.PathLike[str]) -> Any:
    """Read and parse a config file within the limits (size, regular file, UTF-8, then :func:`parse_yaml`)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if not p.is_file():
        raise ConfigError(f"{p}: not a regular file (a directory, device or pipe); expected a YAML config file")
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: {size} bytes; a config file may hold at most {MAX_CONFIG_BYTES} bytes (1 MiB)")
    with p.open("rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)  # a file that grew since stat() is cut, not read on
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: more than {MAX_CONFIG_BYTES} bytes; a config file may hold at most 1 MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})") from None
    return parse_yaml(text, str(p))
