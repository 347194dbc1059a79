"""Turn an artifact request's query string into the cache key it names, or a 422.

The key is (scope kind, scope id, object id), built from parsed parameters in any order: the
Python SDK puts ``object_id`` first, the Node SDK the scope first.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Literal
from urllib.parse import parse_qsl

from proxy.errors import InvalidRequest

ScopeKind = Literal["session", "execution"]
#: Longest id we accept; real ids are a few dozen characters.
MAX_ID_LENGTH = 512
#: Query strings whose parse is remembered (a repeated hit skips parsing; a flood of distinct
#: queries only churns this bounded memo).
PARSED_QUERIES = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


#: Version of the key layout; entries stored under an older one are never read.
KEY_VERSION = "v2"
#: The owner of entries of a split scope asked without any credential.
ANONYMOUS = "-"


@dataclasses.dataclass(frozen=True)
class ArtifactKey:
    scope_kind: ScopeKind
    scope_id: str
    object_id: str
    #: In a split scope (see :mod:`proxy.access`), the fingerprint of the credential whose own
    #: copy this key names; None where entries are shared by every credential with access.
    owner: str | None = None

    @functools.cached_property
    def cache_key(self) -> str:
        """An unambiguous string for the store (ids may contain any character)."""
        parts = [KEY_VERSION, self.scope_kind, self.scope_id, self.object_id]
        if self.owner is not None:
            parts.append(self.owner)
        return json.dumps(parts)

    @classmethod
    def from_cache_key(cls, text: str) -> ArtifactKey | None:
        """The key a stored entry's :attr:`cache_key` names; None for another layout (entries
        stored under an older :data:`KEY_VERSION`, or anything else)."""
        try:
            parts = json.loads(text)
        except ValueError:
            return None
        if (
            not isinstance(parts, list)
            or len(parts) not in (4, 5)
            or parts[0] != KEY_VERSION
            or parts[1] not in ("session", "execution")
            or not all(isinstance(part, str) for part in parts)
        ):
            return None
        owner = parts[4] if len(parts) == 5 else None
        return cls(parts[1], parts[2], parts[3], owner)

    def owned_by(self, fingerprint: str | None) -> ArtifactKey:
        """This key as one credential's own copy (for a split scope)."""
        return dataclasses.replace(self, owner=fingerprint or ANONYMOUS)

    def proof_scope(self, per_object: bool, filler: str | None = None) -> tuple[str, ...]:
        """What an upstream 200 for this key proves access to: its scope, or with
        ``per_object`` (``access_check = "object"``) this one object; with ``filler``, the
        right to read there what that credential's requests stored."""
        scope: tuple[str, ...] = (self.scope_kind, self.scope_id)
        if per_object:
            scope = (*scope, self.object_id)
        return scope if filler is None else (*scope, "filled-by", filler)

    def upstream_params(self) -> dict[str, str]:
        return {"object_id": self.object_id, f"{self.scope_kind}_id": self.scope_id}


def _query_error(name: str, msg: str, kind: str, value: object = None) -> InvalidRequest:
    return InvalidRequest(["query", name], msg, kind, value)


@functools.lru_cache(maxsize=PARSED_QUERIES)
def parse_key(query_string: bytes) -> ArtifactKey | None:
    """The key a ``GET /v1/artifacts`` names; ``None`` when it uses ``filename=`` (uncacheable).

    Raises :class:`InvalidRequest` for requests the API would reject with 422: a missing
    ``object_id``, both or neither of ``session_id``/``execution_id``, repeated or empty values
    (refusals are not remembered; keys are immutable, so one may be shared).
    """
    try:
        pairs = parse_qsl(
            query_string.decode("latin-1"),
            keep_blank_values=True,
            strict_parsing=False,
            encoding="utf-8",
            errors="strict",
        )
    except UnicodeDecodeError:
        raise _query_error("query", "Query string is not valid UTF-8", "value_error") from None
    params: dict[str, list[str]] = {}
    for name, value in pairs:
        params.setdefault(name, []).append(value)

    def single(name: str) -> str | None:
        values = params.get(name)
        if values is None:
            return None
        if len(values) > 1:
            raise _query_error(name, f"Give {name} once, not {len(values)} times", "value_error")
        value = values[0]
        if not value:
            raise _query_error(name, f"{name} must not be empty", "string_too_short", value)
        if len(value) > MAX_ID_LENGTH:
            raise _query_error(
                name, f"{name} is longer than {MAX_ID_LENGTH} characters", "string_too_long"
            )
        if _CONTROL.search(value):
            raise _query_error(name, f"{name} contains control characters", "value_error")
        return value

    if "filename" in params:
        return None
    session_id = single("session_id")
    execution_id = single("execution_id")
    object_id = single("object_id")
    if session_id is None and execution_id is None:
        raise _query_error("session_id", "Either session_id or execution_id is required", "missing")
    if session_id is not None and execution_id is not None:
        raise _query_error(
            "execution_id", "Give session_id or execution_id, not both", "value_error"
        )
    if object_id is None:
        raise _query_error("object_id", "Field required", "missing")
    if session_id is not None:
        return ArtifactKey("session", session_id, object_id)
    assert execution_id is not None
    return ArtifactKey("execution", execution_id, object_id)
