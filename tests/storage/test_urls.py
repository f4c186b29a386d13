"""Storage URLs: where they come from, masking, and one-line errors for every bad one."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from storage import StorageError, embedded, mask_url, open_storage, resolve_url
from storage import cli as storage_cli

SECRET = "pw-SECRET-9"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (f"postgresql://amt:{SECRET}@db:5432/amt", "postgresql://amt:***@db:5432/amt"),
        (f"postgresql://amt:{SECRET}@@db/amt", "postgresql://amt:***@db/amt"),  # '@' in it
        (f"postgresql://amt@db/amt?password={SECRET}", "postgresql://amt@db/amt?password=***"),
        (f"host=db password={SECRET} dbname=amt", "host=db password=*** dbname=amt"),
        ("postgresql://amt@/amt?host=/run/pg", "postgresql://amt@/amt?host=/run/pg"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_resolve_url_prefers_argument_then_environment_then_embedded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(embedded, "ensure_server", lambda: "postgresql://postgres@/emb?host=/x")
    monkeypatch.delenv("AMT_STORAGE_URL", raising=False)
    assert resolve_url() == "postgresql+psycopg2://postgres@/emb?host=/x"
    monkeypatch.setenv("AMT_STORAGE_URL", "")  # empty counts as unset
    assert resolve_url() == "postgresql+psycopg2://postgres@/emb?host=/x"
    monkeypatch.setenv("AMT_STORAGE_URL", "postgres://u@env/db")
    assert resolve_url() == "postgresql+psycopg2://u@env/db"
    assert resolve_url("postgresql+psycopg2://u@arg/db") == "postgresql+psycopg2://u@arg/db"


BAD_URLS = [
    ("", "empty storage URL"),
    ("not a url", "no scheme"),
    (f"foo://u:{SECRET}@h/db", "unknown storage URL scheme 'foo'"),
    (f"mysql://u:{SECRET}@h/db", "MySQL is not supported"),
    ("sqlite:///study.db", "SQLite is not supported"),
    (f"postgresql+pg8000://u:{SECRET}@h/db", "driver 'pg8000' is not supported"),
    (f"postgresql+psycopg://u:{SECRET}@h/db", "driver 'psycopg' is not installed"),
    (f"postgresql://u:{SECRET}@h:port/db", "bad port"),
    (f"postgresql://u:{SECRET}@h:5432", "no database name"),
    (f"postgresql://u:{SECRET}@127.0.0.1:1/db", "connection refused"),
]


@pytest.mark.parametrize(("url", "expected"), BAD_URLS)
def test_bad_urls_give_one_line_errors(url: str, expected: str) -> None:
    with pytest.raises(StorageError) as caught:
        open_storage(url)
    _assert_one_clean_line(str(caught.value), expected)


def test_unknown_database_and_user(new_database: Callable[[], str]) -> None:
    base = new_database().rsplit("/", 1)[0]  # the test server, e.g. postgresql://postgres@host
    with pytest.raises(StorageError) as caught:
        open_storage(f"{base}/amt_no_such_db")
    _assert_one_clean_line(str(caught.value), "database 'amt_no_such_db' does not exist")
    scheme, rest = base.split("://")
    with pytest.raises(StorageError) as caught:
        open_storage(f"{scheme}://amt_nobody:{SECRET}@{rest.split('@')[-1]}/postgres")
    _assert_one_clean_line(str(caught.value), "no user 'amt_nobody'")


def test_db_url_masks_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    storage_cli.register(parser.add_subparsers())
    url = f"postgresql://amt:{SECRET}@db/amt"
    for extra, shown in (([], "amt:***@db"), (["--show-password"], f"amt:{SECRET}@db")):
        args = parser.parse_args(["db", "url", "--storage", url, *extra])
        assert args.func(args) == 0
        assert capsys.readouterr().out == f"postgresql+psycopg2://{shown}/amt\n"


def _assert_one_clean_line(message: str, expected: str) -> None:
    assert expected in message
    assert "\n" not in message
    assert SECRET not in message
