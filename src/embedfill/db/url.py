"""DATABASE_URLs as applications write them, turned into what libpq accepts.

Pure: ``normalize_url`` parses, checks and rewrites; it never connects. What it accepts:

- ``postgresql://`` and ``postgres://`` (and ``pgsql://``, ``postgis://``, as some
  frameworks write them); SQLAlchemy's ``postgresql+DRIVER://`` (the driver is
  dropped); libpq ``key=value`` strings pass through unchanged.
- every libpq parameter (``sslmode``, ``options``, ``host``, ``application_name``, ...)
  passes through as written.
- Prisma's ``schema=NAME`` becomes the search path ``"NAME",public`` (through libpq's
  ``options``): unqualified table names resolve in NAME as the app sees them, and
  pgvector's ``vector`` type, usually installed in ``public``, still resolves. JDBC's
  ``currentSchema=A,B`` does the same for its list of schemas.
- ``connection_limit=N`` caps each run at N connections (see ``Database.writers``).
- ``pgbouncer=true`` (or ``statement_cache_size=0``) turns off server-side prepared
  statements, with a warning: a run holds a session advisory lock, which a pgbouncer in
  transaction pool mode cannot keep.
- asyncpg's ``ssl=require`` becomes ``sslmode=require``; Prisma's pool settings
  (``pool_timeout``, ``socket_timeout``) tune Prisma's own pool and are dropped.
- anything else is a ConfigError naming the parameter.

Errors never quote the URL: libpq's own parse errors quote fragments of it (a password
with a stray ``%`` or ``@`` shows up in them), so they are never shown; the part that is
malformed is named in words instead.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, unquote

import psycopg
from psycopg import conninfo, pq

from ..errors import ConfigError

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9.+-]*)://")
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCHEMES = ("postgresql", "postgres", "pgsql", "postgis")
_LIBPQ_DOCS = "https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS"
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
#: Prisma's client-side pool settings: meaningless for embedfill's own connections
_DROPPED = ("pool_timeout", "socket_timeout")

PGBOUNCER_NOTE = (
    "DATABASE_URL has pgbouncer=true: embedfill turns off server-side prepared statements; "
    "each run holds a session advisory lock, which a pgbouncer in transaction pool mode "
    "cannot keep, so point embedfill at a pgbouncer in session mode or straight at "
    "PostgreSQL."
)


@dataclass(frozen=True)
class NormalizedUrl:
    url: str  # what libpq accepts
    prepare: bool = True  # False behind pgbouncer: no server-side prepared statements
    connection_limit: int | None = None  # at most this many connections per run
    notes: tuple[str, ...] = ()  # warnings for the user


@lru_cache(maxsize=1)
def libpq_parameters() -> frozenset[str]:
    """Every connection parameter this libpq knows."""
    return frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())


def _malformed(why: str) -> ConfigError:
    return ConfigError(f"DATABASE_URL is not a valid PostgreSQL URL ({why}); fix it.")


def normalize_url(raw: str) -> NormalizedUrl:
    """``raw`` as libpq accepts it, or a ConfigError that names what is wrong in words."""
    text = raw.strip()
    m = _SCHEME.match(text)
    if m is None:
        if "://" in text:
            raise _wrong_scheme()
        return _keyword_value(text)
    base = m.group(1).lower().partition("+")[0]
    if base not in _SCHEMES:
        raise _wrong_scheme()
    rest = text[m.end() :]
    ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
    end = min(ends) if ends else len(rest)
    authority, tail = rest[:end], rest[end:]
    _check_at_signs(authority, tail)
    userinfo, _, hosts = authority.rpartition("@")
    user, _, password = userinfo.partition(":")
    path, _, query = tail.partition("?")
    _check_escapes(user, "user name")
    _check_escapes(password, "password")
    _check_escapes(hosts, "host part")
    _check_escapes(path, "database name")
    _check_ports(hosts)
    params, prepare, limit, notes = _rewrite_query(query)
    url = f"postgresql://{authority}{path}" + ("?" + "&".join(params) if params else "")
    try:
        conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        raise _malformed("check its host, port and parameters") from None
    return NormalizedUrl(url=url, prepare=prepare, connection_limit=limit, notes=notes)


def _wrong_scheme() -> ConfigError:
    return ConfigError(
        "DATABASE_URL must be a PostgreSQL URL, postgresql://user:password@host:port/dbname "
        "(postgres://, pgsql://, postgis:// and postgresql+DRIVER:// work too); fix it."
    )


def _keyword_value(text: str) -> NormalizedUrl:
    try:
        conninfo.conninfo_to_dict(text)
    except psycopg.Error:
        raise ConfigError(
            "DATABASE_URL is not a valid PostgreSQL connection string; write it as "
            "postgresql://user:password@host:port/dbname or as libpq key=value pairs "
            "(quote a value with spaces in single quotes); fix it."
        ) from None
    return NormalizedUrl(url=text)


def _check_at_signs(authority: str, tail: str) -> None:
    """The '@' that ends user:password must be the only raw one, before the host."""
    if authority.count("@") > 1:
        raise _malformed("the user name or password has an '@' in it: write it as %40")
    if "@" not in tail:
        return
    if tail.startswith("/"):
        raise _malformed(
            "it has an '@' after a '/': a '/' in the user name or password must be written "
            "%2F, and an '@' as %40"
        )
    raise _malformed(
        "it has an '@' after the '?': a '?' in the user name or password must be written "
        "%3F, and an '@' as %40"
    )


def _check_escapes(text: str, part: str) -> None:
    if any(c.isspace() for c in text):  # libpq refuses them, quoting the part
        raise _malformed(f"the {part} has a space in it: a space must be written %20")
    i = text.find("%")
    while i >= 0:
        digits = text[i + 1 : i + 3]
        if len(digits) < 2 or any(c not in string.hexdigits for c in digits):
            raise _malformed(
                f"the {part} has a '%' that is not followed by two hex digits: "
                "a '%' in it must be written %25"
            )
        if digits == "00":
            raise _malformed(f"the {part} holds %00, a NUL byte, which PostgreSQL refuses")
        i = text.find("%", i + 3)


def _check_ports(hosts: str) -> None:
    for host in hosts.split(","):
        port = host.rpartition("]")[2] if host.startswith("[") else host
        if ":" in port and not port.rpartition(":")[2].isdigit():
            raise _malformed("a port in the host part is not a number")


def _decode(value: str, part: str) -> str:
    _check_escapes(value, part)
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise _malformed(f"the {part} is not valid UTF-8 once decoded") from None


def _rewrite_query(query: str) -> tuple[list[str], bool, int | None, tuple[str, ...]]:
    """The query string for libpq, and what embedfill itself takes from it."""
    out: list[tuple[str, str]] = []
    prepare, limit = True, None
    schema: list[str] | None = None
    notes: list[str] = []
    for item in query.split("&") if query else []:
        if not item:
            continue
        if "=" not in item:
            raise _malformed("a parameter after the '?' has no '=': write name=value")
        raw_key, _, raw_value = item.partition("=")
        key = _decode(raw_key, "name of a parameter")
        if not _PLAIN_NAME.fullmatch(key):
            raise _malformed("a parameter name after the '?' is not a plain name")
        value = _decode(raw_value, f"value of parameter {key!r}")
        if key in libpq_parameters():
            out.append((key, raw_value))
        elif key == "schema":
            if not value:
                raise ConfigError("schema in DATABASE_URL is empty; name a schema or drop it.")
            schema = [value]
        elif key == "currentSchema":  # JDBC's: a comma-separated list
            names = [n.strip() for n in value.split(",")]
            if not all(names):
                raise ConfigError(
                    "currentSchema in DATABASE_URL has an empty schema name; name the "
                    "schemas, separated by commas, or drop it."
                )
            schema = names
        elif key == "connection_limit":
            limit = _positive_int(value, "connection_limit")
        elif key == "pgbouncer":
            if _flag(value, "pgbouncer"):
                prepare = False
                notes.append(PGBOUNCER_NOTE)
        elif key == "statement_cache_size":
            if _whole_number(value, "statement_cache_size") == 0:
                prepare = False
        elif key == "ssl":
            out.append(("sslmode", _sslmode(value)))
        elif key not in _DROPPED:
            raise ConfigError(
                f"DATABASE_URL has the parameter {key!r}, which neither PostgreSQL nor "
                f"embedfill knows; remove it or use a libpq parameter ({_LIBPQ_DOCS})."
            )
    if schema is not None:
        out = _with_search_path(out, schema)
    return [f"{k}={v}" for k, v in out], prepare, limit, tuple(notes)


def _with_search_path(params: list[tuple[str, str]], schemas: list[str]) -> list[tuple[str, str]]:
    option = search_path_option(*schemas)
    for i, (key, raw) in enumerate(params):
        if key == "options":
            joined = f"{unquote(raw)} {option}".strip()
            return [*params[:i], ("options", quote(joined, safe="")), *params[i + 1 :]]
    return [*params, ("options", quote(option, safe=""))]


def search_path_option(*schemas: str) -> str:
    """``-csearch_path="schema",public`` for libpq's options: each name double-quoted for
    the server, spaces and backslashes escaped for the options parser; ``public`` last
    unless named (pgvector's types usually live there)."""
    names = list(dict.fromkeys(schemas))
    value = ",".join('"' + name.replace('"', '""') + '"' for name in names)
    if "public" not in names:
        value += ",public"
    return "-csearch_path=" + "".join("\\" + c if c.isspace() or c == "\\" else c for c in value)


def _whole_number(value: str, name: str) -> int:
    if not value.isdigit():
        raise ConfigError(f"{name} in DATABASE_URL must be a whole number.")
    return int(value)


def _positive_int(value: str, name: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{name} in DATABASE_URL must be a whole number of at least 1.")
    return int(value)


def _flag(value: str, name: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"{name} in DATABASE_URL must be true or false.")


def _sslmode(value: str) -> str:
    if value.lower() in _TRUE:
        return "require"
    if value.lower() in _FALSE:
        return "disable"
    if value.lower() in _SSLMODES:
        return value.lower()
    raise ConfigError(
        f"ssl in DATABASE_URL must be true, false or an sslmode ({', '.join(_SSLMODES)})."
    )
