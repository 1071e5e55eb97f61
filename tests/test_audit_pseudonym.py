"""The customer pseudonym of audit log lines is HMAC-SHA256 of the customer id under
FRAUD_PSEUDONYM_KEY, checked against `hmac.new(key, id, sha256)` and against the RFC 4231
known-answer vector (so a wrong hash, key or truncation fails even if both sides used hmac)."""

from __future__ import annotations

import hashlib
import hmac

from fraud.audit.records import PSEUDONYM_KEY_ENV, pseudonymise
from tests.test_audit_support import make_decision

PREFIX = "cust_"
DIGITS = 20  # hex digits kept: 80 bits


def expected(key: str, customer_id: str) -> str:
    return PREFIX + hmac.new(key.encode(), customer_id.encode(), hashlib.sha256).hexdigest()[:DIGITS]


def test_the_pseudonym_is_hmac_sha256_of_the_customer_id(monkeypatch):
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "audit-log-key-2026")
    for customer_id in ("C0000042", "C0000043", "customer with spaces", "Ç-ünïcode"):
        assert pseudonymise(customer_id) == expected("audit-log-key-2026", customer_id)
    fields = make_decision(42, customer_id="C0000042").log_fields()
    assert fields["customer"] == expected("audit-log-key-2026", "C0000042")


def test_rfc_4231_known_answer(monkeypatch):
    """RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?"."""
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "Jefe")
    full = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    assert pseudonymise("what do ya want for nothing?") == PREFIX + full[:DIGITS]


def test_another_key_gives_another_pseudonym(monkeypatch):
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "key-one")
    first = pseudonymise("C0000042")
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "key-two")
    assert pseudonymise("C0000042") == expected("key-two", "C0000042") != first
