"""Keep credentials out of logs, error messages, status answers and files.

One helper, :func:`redact_url`, used wherever a connection URL (the Redis online store's, for
one) is shown: in :meth:`~streamrec.features.repo.OnlineStoreSettings.describe` (and so in
``/readyz``, ``/v1/admin/status``, reports and log lines), in error messages, and in ``repr``.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

#: What a secret is replaced with.
MASK = "***"
#: Query parameters that carry a secret (redis-py reads ``?password=...`` too).
SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "secret", "token", "access_token"})


def redact_url(url: str | None) -> str:
    """``url`` with its password (and any secret query parameter) replaced by ``***``.

    ``redis://user:s3cret@host:6379/0`` becomes ``redis://user:***@host:6379/0`` and
    ``redis://:s3cret@host/0`` becomes ``redis://:***@host/0``. Everything up to the *last*
    ``@`` counts as credentials, so a password holding an unescaped ``@``, ``/`` or ``?`` is
    masked too (over-masking is the safe side). A user part without a colon
    (``redis://s3cret@host``) may be a bare password, so it is masked whole. Text that is not
    ``scheme://...`` comes back unchanged only when it has no ``@`` and no ``=``, else as a
    placeholder: never the secret.

    Args:
        url: A URL, or None.

    Returns:
        The URL, safe to log and show (``""`` for None or an empty string).
    """
    if not url:
        return ""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url if "@" not in url and "=" not in url else "<redacted: not a URL>"
    userinfo, at, location = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:{MASK}@{location}" if colon else f"{MASK}@{location}"
    else:  # "redis://:s3cret" (the "@" forgotten): a "port" that is not a number may be a password
        authority, tail = _split_authority(rest)
        host, colon, port = authority.rpartition(":")
        if colon and not port.isdigit() and not authority.endswith("]"):
            rest = f"{host}:{MASK}{tail}"
    head, qmark, query = rest.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_QUERY_KEYS for k, _ in pairs):
            masked = [(k, MASK if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs]
            rest = f"{head}?{urlencode(masked, safe='*')}{hash_}{fragment}"
    return f"{scheme}://{rest}"


def _split_authority(rest: str) -> tuple[str, str]:
    """``host:port`` and what follows it (``/path?query#fragment``) of ``rest``."""
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    return rest[:cut], rest[cut:]


__all__ = ["MASK", "SECRET_QUERY_KEYS", "redact_url"]
