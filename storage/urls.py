"""Which PostgreSQL a study lives in: resolving, checking and masking storage URLs.

amt-search keeps studies in PostgreSQL only (the embedded server on a laptop or in CI, a real
one in production): one engine everywhere, because many workers write at once. Every error
here is one line that says what is wrong and what to do, and never contains a password.
"""

from __future__ import annotations

import importlib.util
import os
import re

from storage.errors import StorageError

ENV_VAR = "AMT_STORAGE_URL"
URL_FORM = "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
_DRIVERS = {"": "psycopg2", "psycopg2": "psycopg2", "psycopg": "psycopg"}
_PIP_NAMES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]"}
_OTHER_ENGINES = {
    "mysql": "MySQL",
    "mariadb": "MariaDB",
    "oracle": "Oracle",
    "mssql": "SQL Server",
    "redis": "Redis",
}


def mask_url(url: str) -> str:
    """``url`` with every password replaced by ``***`` (user info and ``password=`` params).

    Masks generously: with a malformed URL it may hide more than the password, never less.
    """
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        at = rest.rfind("@")
        user, colon, _ = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
        url = f"{scheme}://{rest}"
    return re.sub(r"(password\s*=\s*)('[^']*'|[^\s&]+)", r"\1***", url, flags=re.IGNORECASE)


def resolve_url(url: str | None = None) -> str:
    """The storage URL ``open_storage`` uses: ``url``, else ``$AMT_STORAGE_URL``, else the
    embedded PostgreSQL (started, or joined when another process started it).

    Raises StorageError when the URL is malformed, names another database engine or a
    PostgreSQL driver that is not installed. An empty ``$AMT_STORAGE_URL`` counts as unset.
    """
    if url is None:
        url = os.environ.get(ENV_VAR) or None
    if url is None:
        from storage import embedded

        url = embedded.ensure_server()
    return check_url(url)


def check_url(url: str) -> str:
    """``url`` checked for syntax, engine and driver, with the driver made explicit:
    ``postgres://`` and ``postgresql://`` become ``postgresql+psycopg2://``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = url.strip()
    if not url:
        raise StorageError(
            f"empty storage URL — give {URL_FORM}, or leave --storage and {ENV_VAR} unset "
            "to use the embedded PostgreSQL"
        )
    shown = mask_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise StorageError(f"bad storage URL '{shown}': no scheme — expected {URL_FORM}")
    engine, _, driver = scheme.lower().partition("+")
    if engine == "postgres":
        engine = "postgresql"
    if engine == "sqlite":
        raise StorageError(
            f"SQLite is not supported (storage URL '{shown}'): studies live in PostgreSQL only, "
            f"because many workers write to them at once — give {URL_FORM}, or leave --storage "
            f"and {ENV_VAR} unset to use the embedded PostgreSQL"
        )
    if engine in _OTHER_ENGINES:
        raise StorageError(
            f"{_OTHER_ENGINES[engine]} is not supported (storage URL '{shown}'): studies live in "
            f"PostgreSQL only — give {URL_FORM}"
        )
    if engine != "postgresql":
        raise StorageError(
            f"unknown storage URL scheme '{scheme}' in '{shown}' — expected {URL_FORM}"
        )
    if driver not in _DRIVERS:
        raise StorageError(
            f"PostgreSQL driver '{driver}' is not supported (storage URL '{shown}') — use "
            "postgresql:// (psycopg2) or postgresql+psycopg://"
        )
    module = _DRIVERS[driver]
    if importlib.util.find_spec(module) is None:
        raise StorageError(
            f"the PostgreSQL driver '{module}' is not installed (storage URL '{shown}') — "
            f"pip install {_PIP_NAMES[module]}"
        )
    # Explicit driver: SQLAlchemy 2.1 made psycopg (3) the default for postgresql://.
    url = f"{engine}+{module}://{rest}"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        reason = "bad port" if isinstance(e, ValueError) else "cannot parse it"
        raise StorageError(f"bad storage URL '{shown}' ({reason}) — expected {URL_FORM}") from None
    if not parsed.database:
        raise StorageError(
            f"no database name in storage URL '{shown}' — add /DATABASE, as in {URL_FORM}"
        )
    parts = (parsed.username, parsed.password, parsed.host, parsed.database,
             *map(str, parsed.query.values()))
    if "\x00" in url or any("\x00" in str(part) for part in parts if part is not None):
        raise StorageError(f"bad storage URL '{shown}': it holds a NUL character (%00)")
    if "@" in (parsed.host or ""):
        raise StorageError(
            f"bad storage URL '{shown}': more than one '@' — an '@' in the user name or "
            "password must be written %40"
        )
    return url


def where(url: str) -> str:
    """``host:port/database`` (or the socket directory) of ``url``, for messages; no secrets."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    host = parsed.host or str(parsed.query.get("host") or "localhost")
    port = parsed.port or parsed.query.get("port") or 5432
    return f"{host}:{port}/{parsed.database}"


def connect_error(url: str, error: BaseException) -> StorageError:
    """A one-line StorageError saying why connecting to ``url`` failed and what to do."""
    from sqlalchemy.engine import make_url

    from storage import embedded

    if embedded.is_embedded_url(url) and embedded.data_dir_gone():
        return embedded.DataDirectoryGone(embedded.GONE_MESSAGE.format(embedded.data_dir()))
    parsed = make_url(url)
    user = parsed.username or "(default user)"
    at = where(url)
    message = str(getattr(error, "orig", None) or error).strip()
    if parsed.password:
        message = message.replace(parsed.password, "***")
    lowered = message.lower()
    first_line = message.splitlines()[0] if message else type(error).__name__
    if "password authentication failed" in lowered:
        return StorageError(
            f"PostgreSQL at {at} rejected user '{user}': wrong password or user — check the "
            f"credentials in --storage or {ENV_VAR}"
        )
    if "no password supplied" in lowered or "password is required" in lowered:
        return StorageError(
            f"PostgreSQL at {at} wants a password for user '{user}' — put it in the URL: "
            f"postgresql://{user}:PASSWORD@..."
        )
    if re.search(r'role ".*" does not exist', lowered):
        return StorageError(
            f"PostgreSQL at {at} has no user '{user}' — create it, or fix the user in the URL"
        )
    if re.search(r'database ".*" does not exist', lowered):
        return StorageError(
            f"database '{parsed.database}' does not exist on PostgreSQL at {at} — create it "
            f"(createdb {parsed.database}) or fix the database name in the URL"
        )
    if "could not translate host name" in lowered or "name or service not known" in lowered:
        return StorageError(
            f"unknown database host '{parsed.host}' (storage URL '{mask_url(url)}') — "
            "fix the host name"
        )
    if "timeout expired" in lowered:
        return StorageError(
            f"PostgreSQL at {at} did not answer in time — check the host, port and firewall"
        )
    if "connection refused" in lowered or "no such file or directory" in lowered:
        return StorageError(
            f"cannot reach PostgreSQL at {at} (connection refused) — is the server running, "
            "and are the host and port in the URL right?"
        )
    return StorageError(f"cannot connect to PostgreSQL at {at}: {first_line}")
