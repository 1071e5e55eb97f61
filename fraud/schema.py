"""The transaction schema: the one place that says what a card transaction is.

Raw historical transactions (what the simulator writes and what `ingest` validates) carry
labels; a scoring request carries only the fields known at authorisation time. Training,
serving, the feature store and the tests all import these definitions.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, field_validator

# --- identifiers ----------------------------------------------------------------------------
TRANSACTION_ID = "transaction_id"
CUSTOMER_ID = "customer_id"
TERMINAL_ID = "terminal_id"
TX_DATETIME = "tx_datetime"
TX_AMOUNT = "tx_amount"
TX_FRAUD = "tx_fraud"
TX_FRAUD_SCENARIO = "tx_fraud_scenario"

#: Largest amount a request may carry; larger is treated as absurd input (HTTP 400).
MAX_TX_AMOUNT = 1_000_000.0
#: Longest identifier accepted on the wire.
MAX_ID_LENGTH = 64
#: Longest V2 request `id` accepted on the wire.
MAX_REQUEST_ID_LENGTH = 128
#: Characters an identifier may hold: ASCII letters, digits and `- _ . : @ / + =` (UUIDs, surrogate
#: keys, base64/base64url network tokens). No spaces, no control characters (NUL included), nothing
#: outside ASCII: identifiers are keys in Redis, the audit database and exports.
ID_CHARACTERS = "A-Z a-z 0-9 - _ . : @ / + ="
_ID_PATTERN = re.compile(r"[A-Za-z0-9\-_.:@/+=]+")
#: Separators a card number is commonly written with; stripped before the card-number check.
_PAN_SEPARATORS = re.compile(r"[\- ]")
PAN_MIN_DIGITS = 13
PAN_MAX_DIGITS = 19
#: Longest invalid value echoed back in an error message (the rest is cut).
MAX_ECHO_CHARS = 40


def echo(value: Any) -> str:
    """`repr(value)` cut to MAX_ECHO_CHARS characters, for error messages (never echo a whole body)."""
    text = repr(value)
    if len(text) <= MAX_ECHO_CHARS:
        return text
    return f"{text[:MAX_ECHO_CHARS]}... ({len(text)} characters)"


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check digit of a string of ASCII digits holds."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if position % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def looks_like_card_number(value: str) -> bool:
    """True for a value shaped like a primary account number (PAN): 13-19 ASCII digits, optionally
    grouped with spaces or dashes, whose Luhn check digit holds. Callers send network tokens or
    surrogate ids instead (docs/serving.md); a PAN is never stored."""
    digits = _PAN_SEPARATORS.sub("", value)
    return (
        PAN_MIN_DIGITS <= len(digits) <= PAN_MAX_DIGITS and digits.isascii() and digits.isdigit() and luhn_valid(digits)
    )


def identifier_problem(value: Any, max_length: int = MAX_ID_LENGTH) -> str | None:
    """Why `value` is not an acceptable identifier (None when it is): a string of 1..max_length
    characters from ID_CHARACTERS that is not shaped like a card number."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > max_length:
        return f"must be at most {max_length} characters, got {len(value)}"
    if looks_like_card_number(value):  # before the character check: a PAN is never echoed
        return "looks like a card number (PAN); send a network token or a surrogate id instead"
    if not _ID_PATTERN.fullmatch(value):
        return f"may only hold the characters {ID_CHARACTERS}, got {echo(value)}"
    return None


def check_identifier(value: Any, max_length: int = MAX_ID_LENGTH) -> str:
    """`value` if it is an acceptable identifier, else ValueError with the reason."""
    problem = identifier_problem(value, max_length)
    if problem is not None:
        raise ValueError(problem)
    return value


#: Columns of a raw transaction record, in storage order, with their Arrow types.
#: Timestamps are UTC, stored tz-naive with microsecond resolution (whole seconds in practice).
RAW_TRANSACTION_SCHEMA = pa.schema(
    [
        pa.field(TRANSACTION_ID, pa.string(), nullable=False),
        pa.field(TX_DATETIME, pa.timestamp("us"), nullable=False),
        pa.field(CUSTOMER_ID, pa.string(), nullable=False),
        pa.field(TERMINAL_ID, pa.string(), nullable=False),
        pa.field(TX_AMOUNT, pa.float64(), nullable=False),
        pa.field("tx_time_seconds", pa.int64(), nullable=False),
        pa.field("tx_time_days", pa.int64(), nullable=False),
        pa.field(TX_FRAUD, pa.int8(), nullable=False),
        pa.field(TX_FRAUD_SCENARIO, pa.int8(), nullable=False),
    ]
)

#: Fields a scoring request carries (no labels), in wire order.
REQUEST_FIELDS: tuple[str, ...] = (TRANSACTION_ID, CUSTOMER_ID, TERMINAL_ID, TX_AMOUNT, TX_DATETIME)

CUSTOMER_PROFILE_SCHEMA = pa.schema(
    [
        pa.field(CUSTOMER_ID, pa.string(), nullable=False),
        pa.field("x_customer_id", pa.float64(), nullable=False),
        pa.field("y_customer_id", pa.float64(), nullable=False),
        pa.field("mean_amount", pa.float64(), nullable=False),
        pa.field("std_amount", pa.float64(), nullable=False),
        pa.field("mean_nb_tx_per_day", pa.float64(), nullable=False),
        pa.field("age", pa.int16(), nullable=False),
        pa.field("account_open_date", pa.date32(), nullable=False),
        pa.field("nb_available_terminals", pa.int32(), nullable=False),
    ]
)

MERCHANT_CATEGORIES: tuple[str, ...] = ("grocery", "gas", "restaurant", "retail", "online")

TERMINAL_PROFILE_SCHEMA = pa.schema(
    [
        pa.field(TERMINAL_ID, pa.string(), nullable=False),
        pa.field("x_terminal_id", pa.float64(), nullable=False),
        pa.field("y_terminal_id", pa.float64(), nullable=False),
        pa.field("merchant_category", pa.string(), nullable=False),
    ]
)


def customer_key(index: int) -> str:
    """Identifier of the index-th simulated customer (card)."""
    return f"C{index:07d}"


def terminal_key(index: int) -> str:
    """Identifier of the index-th simulated terminal (merchant)."""
    return f"T{index:07d}"


def transaction_key(index: int) -> str:
    """Identifier of the index-th simulated transaction."""
    return f"TX{index:010d}"


def parse_timestamp(value: Any) -> datetime:
    """Parse a wire timestamp into a tz-naive UTC datetime.

    Accepts ISO-8601 strings (with or without offset; no offset means UTC), integer Unix epoch
    seconds, and datetimes. Raises ValueError with a readable reason otherwise.
    """
    if isinstance(value, bool):
        raise ValueError("must be an ISO-8601 string or integer epoch seconds, not a boolean")
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, (int,)) or (isinstance(value, float) and value.is_integer()):
        seconds = int(value)
        if not (0 <= seconds < 4_102_444_800):  # 1970 .. 2100
            raise ValueError(f"epoch seconds {seconds} out of range [0, 4102444800)")
        dt = datetime.fromtimestamp(seconds, tz=UTC)
    elif isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        text = text.strip()
        if not text:
            raise ValueError("must not be empty")
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{echo(text)} is not an ISO-8601 timestamp") from None
    else:
        raise ValueError(f"must be an ISO-8601 string or integer epoch seconds, got {type(value).__name__}")
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    if not (1970 <= dt.year < 2100):
        raise ValueError(f"{dt.isoformat()} is out of range (1970..2099)")
    return dt


class TransactionRequest(BaseModel):
    """One transaction as an authorisation flow sends it for scoring.

    Unknown fields are rejected so that a misspelled field never silently scores with a default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    transaction_id: str
    customer_id: str
    terminal_id: str
    tx_amount: float
    tx_datetime: datetime

    @field_validator("transaction_id", "customer_id", "terminal_id", mode="before")
    @classmethod
    def _identifier(cls, value: Any) -> str:
        return check_identifier(value)

    @field_validator("tx_amount", mode="before")
    @classmethod
    def _amount_is_a_positive_finite_number(cls, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {type(value).__name__}")
        amount = float(value)
        if math.isnan(amount) or math.isinf(amount):
            raise ValueError("must be a finite number")
        if amount <= 0:
            raise ValueError(f"must be > 0, got {amount}")
        if amount > MAX_TX_AMOUNT:
            raise ValueError(f"must be <= {MAX_TX_AMOUNT:.0f}, got {amount}")
        return amount

    @field_validator("tx_datetime", mode="before")
    @classmethod
    def _timestamp_is_parseable(cls, value: Any) -> datetime:
        return parse_timestamp(value)
