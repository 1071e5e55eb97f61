"""Connections to the stores: the audit database URL composed from split settings (any character
in the password works, TLS settings reach libpq and verify-full refuses a server without TLS),
Redis over TLS (`FRAUD_REDIS_TLS` or a `rediss://` URL) in the form Feast's client reads."""

from __future__ import annotations

import pytest
from feast.infra.online_stores.redis import RedisOnlineStore
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from fraud.audit.store import audit_db_url, compose_db_url, create_audit_engine
from fraud.errors import UserError
from fraud.feature_store import redis_connection_string
from tests.test_audit_support import PG_HOST, PG_PORT, pg_database  # noqa: F401

AWKWARD = "p@ss/w:rd%40?#&=+ x"


def _settings(database: str, **extra: str) -> dict[str, str]:
    return {
        "FRAUD_AUDIT_DB_HOST": PG_HOST,
        "FRAUD_AUDIT_DB_PORT": str(PG_PORT),
        "FRAUD_AUDIT_DB_NAME": database,
        **extra,
    }


def test_the_composed_url_keeps_every_character_of_the_credentials():
    url = make_url(
        compose_db_url(
            _settings(
                "fraud",
                FRAUD_AUDIT_DB_USER="writer@fraud",
                FRAUD_AUDIT_DB_PASSWORD=AWKWARD,
                FRAUD_AUDIT_DB_SSLMODE="verify-full",
                FRAUD_AUDIT_DB_SSLROOTCERT="/etc/fraud/postgres-ca/ca.crt",
            )
        )
    )
    assert (url.username, url.password, url.host, url.database) == ("writer@fraud", AWKWARD, PG_HOST, "fraud")
    assert dict(url.query) == {"sslmode": "verify-full", "sslrootcert": "/etc/fraud/postgres-ca/ca.crt"}
    assert compose_db_url({}) is None


def test_bad_split_settings_are_user_errors():
    with pytest.raises(UserError, match="FRAUD_AUDIT_DB_SSLMODE"):
        compose_db_url(_settings("fraud", FRAUD_AUDIT_DB_SSLMODE="verify_full"))
    with pytest.raises(UserError, match="FRAUD_AUDIT_DB_PORT"):
        compose_db_url(_settings("fraud", FRAUD_AUDIT_DB_PORT="54x"))


def test_the_split_settings_are_the_default_audit_database(monkeypatch):
    monkeypatch.delenv("FRAUD_AUDIT_DB_URL", raising=False)
    for name, value in _settings("audit_here", FRAUD_AUDIT_DB_USER="u", FRAUD_AUDIT_DB_PASSWORD="a/b@c").items():
        monkeypatch.setenv(name, value)
    assert make_url(audit_db_url()).database == "audit_here"
    assert make_url(audit_db_url()).password == "a/b@c"


@pytest.mark.postgres
def test_a_role_whose_password_has_at_and_slash_connects(pg_database):  # noqa: F811
    role = f"{pg_database.name}_w"
    pg_database.execute_admin(f"CREATE ROLE {role} LOGIN PASSWORD %s", AWKWARD)
    try:
        engine = create_audit_engine(
            compose_db_url(
                _settings(pg_database.name, FRAUD_AUDIT_DB_USER=role, FRAUD_AUDIT_DB_PASSWORD=AWKWARD)
                | {"FRAUD_AUDIT_DB_SSLMODE": "disable"}
            )
        )
        with engine.connect() as connection:
            assert connection.execute(text("SELECT current_user")).scalar_one() == role
        engine.dispose()
    finally:
        pg_database.execute_admin(f"DROP ROLE IF EXISTS {role}")


@pytest.mark.postgres
def test_verify_full_never_falls_back_to_plain_text(pg_database, tmp_path):  # noqa: F811
    """The local server has no TLS: with verify-full the connection is refused, not downgraded."""
    ca = tmp_path / "ca.crt"
    ca.write_text("not used: the server offers no TLS at all\n")
    engine = create_audit_engine(
        compose_db_url(
            _settings(pg_database.name, FRAUD_AUDIT_DB_SSLMODE="verify-full", FRAUD_AUDIT_DB_SSLROOTCERT=str(ca))
        )
    )
    with pytest.raises(OperationalError, match="SSL"), engine.connect():
        pass
    engine.dispose()


def _feast_kwargs(connection: str) -> dict:
    _nodes, params = RedisOnlineStore._parse_connection_string(connection)
    return params


def test_redis_tls_from_the_split_settings():
    connection = redis_connection_string(
        {
            "FRAUD_REDIS_HOST": "redis-master.redis-prod.svc.cluster.local",
            "FRAUD_REDIS_PASSWORD": "s3cret",
            "FRAUD_REDIS_TLS": "true",
            "FRAUD_REDIS_CA_CERT": "/etc/fraud/redis-ca/ca.crt",
        }
    )
    assert connection.startswith("redis-master.redis-prod.svc.cluster.local:6379,")
    assert _feast_kwargs(connection) == {
        "password": "s3cret",
        "ssl": True,
        "ssl_ca_certs": "/etc/fraud/redis-ca/ca.crt",
    }
    plain = redis_connection_string({"FRAUD_REDIS_HOST": "r", "FRAUD_REDIS_TLS": "false"})
    assert "ssl" not in _feast_kwargs(plain)


def test_rediss_urls_mean_tls_with_decoded_credentials():
    connection = redis_connection_string(
        {"FRAUD_REDIS_URL": "rediss://scorer:p%40ss%2Fword@redis.example:6380?ssl_ca_certs=/etc/ca.crt"}
    )
    nodes, params = RedisOnlineStore._parse_connection_string(connection)
    assert nodes == [{"host": "redis.example", "port": "6380"}]
    assert params == {"username": "scorer", "password": "p@ss/word", "ssl": True, "ssl_ca_certs": "/etc/ca.crt"}
    assert "ssl" not in _feast_kwargs(redis_connection_string({"FRAUD_REDIS_URL": "redis://redis.example"}))
    with pytest.raises(UserError, match="not Redis URLs"):
        redis_connection_string({"FRAUD_REDIS_URL": "https://redis.example"})
