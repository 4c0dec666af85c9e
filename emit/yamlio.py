"""The one YAML writer: same object, same bytes, every time.

Block style, keys sorted, no aliases (a reviewer reads every value where it is), strings
that YAML would otherwise read as numbers/booleans/null quoted (``'9080'``, ``'true'``),
multi-line strings as literal blocks, no line folding, trailing newline. A list dumps as a
multi-document stream (``---`` between documents), which is what ``kubectl apply -f`` reads.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import yaml

from observe.errors import MeshwrightError


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    # SafeDumper quotes strings that would resolve to another type ('9080', 'true', '~').
    return dumper.represent_str(data)


def _seq(dumper: yaml.SafeDumper, data: tuple[Any, ...]) -> yaml.SequenceNode:
    return dumper.represent_list(list(data))


def _map(dumper: yaml.SafeDumper, data: dict[Any, Any]) -> yaml.MappingNode:
    # Kubernetes converts YAML to JSON: a non-string key (9080: ...) is an error there.
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise MeshwrightError(f"YAML mapping keys must be strings, got {bad[0]!r}")
    return dumper.represent_dict(data)


_Dumper.add_representer(dict, _map)
_Dumper.add_representer(str, _str)
_Dumper.add_representer(tuple, _seq)


def rfc3339(value: datetime | None) -> str | None:
    """``2024-05-01T12:00:03Z``: UTC, whole seconds (naive datetimes are taken as UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dump_yaml(obj: Any) -> str:
    """Serialize ``obj`` (a dict, or a list of dicts as a multi-document stream)."""
    docs = obj if isinstance(obj, list) else [obj]
    if not docs:
        return ""
    try:
        text = yaml.dump_all(
            docs,
            Dumper=_Dumper,
            default_flow_style=False,
            sort_keys=True,
            allow_unicode=True,
            explicit_start=len(docs) > 1,
            width=1 << 16,
            indent=2,
        )
    except yaml.YAMLError as exc:
        raise MeshwrightError(f"cannot serialize to YAML: {exc}") from exc
    if not text.endswith("\n"):
        text += "\n"
    return text
