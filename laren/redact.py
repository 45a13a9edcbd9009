"""Credentials out of everything laren prints, logs or stores: one redaction used by validate, submit, the tracker,
checkpoints and error messages.

- A URI ``scheme://user:password@host...`` keeps its user and loses its password (``user:***@host``). The userinfo runs
  up to the LAST ``@`` of the URI, so passwords holding ``/``, ``@``, ``:`` or ``#`` are covered whole.
- In nested configs, the values of credential-like keys (secret, password, token, key_id, access_key, api_key,
  credential, private_key) become ``***``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

REDACTED = "***"
_SECRET_KEY = re.compile(r"secret|passw(or)?d|token|key_id|access_key|api_key|credential|private_key", re.IGNORECASE)
_URI = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>[^\s'\"<>`]+)")


def is_secret_key(key: str) -> bool:
    """True for keys whose values must never be logged (matched anywhere in the dotted key, case-insensitive)."""
    return bool(_SECRET_KEY.search(key))


def _userinfo(m: re.Match, mask: Optional[str]) -> str:
    rest = m["rest"]
    at = rest.rfind("@")
    if at < 0:
        return m.group(0)
    user, sep, _ = rest[:at].partition(":")
    if not sep:
        return m.group(0)  # a user name alone
    return f"{m['scheme']}{user}{'' if mask is None else ':' + mask}@{rest[at + 1:]}"


def redact_text(text: str, mask: Optional[str] = REDACTED) -> str:
    """Every ``scheme://user:password@`` in ``text`` with its password replaced by ``mask`` (None: removed)."""
    return _URI.sub(lambda m: _userinfo(m, mask), text) if "://" in text else text


def redact(obj: Any, key: str = "") -> Any:
    """A copy of a (nested) dict/list with credential-like keys' values replaced by ``***`` and URI passwords removed."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact(v, str(k)))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, key) for v in obj]
    return redact_text(obj) if isinstance(obj, str) else obj


def has_password(uri: str) -> bool:
    return redact_text(uri) != uri
