"""The client of the local serving stack (`fraud score`): read transactions from a file or sample
them from the simulated raw data, send them through the stack (V1 or V2 REST) and parse the decisions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import httpx
from pydantic import ValidationError

from fraud.config import MODEL_NAME, DataLayout
from fraud.errors import UserError
from fraud.schema import REQUEST_FIELDS, TX_AMOUNT, TX_DATETIME, TransactionRequest


@dataclass(frozen=True)
class ScoredTransaction:
    """One decision as the stack returned it."""

    transaction_id: str
    fraud_probability: float
    decision: str
    reasons: list[str]
    model_version: str
    features_missing: bool
    features_stale: bool


def load_transactions_file(path: Path) -> list[dict]:
    """Transactions from a .jsonl file (one object a line) or a .json file (a list, or {"instances": [...]}).

    Each is validated with `TransactionRequest`; a bad one raises UserError naming the line/index and field.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--file {path}: no such file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--file {path}: cannot read: {exc}") from None
    records: list[tuple[str, object]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"--file {path}: line {number} is not JSON: {exc.msg}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--file {path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if isinstance(data, dict) and "instances" in data:
            data = data["instances"]
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise UserError(f'--file {path}: expected a list of transactions or {{"instances": [...]}}')
        records = [(f"item {index}", item) for index, item in enumerate(data)]
    else:
        raise UserError(f"--file {path}: the file must end in .jsonl or .json")
    if not records:
        raise UserError(f"--file {path}: holds no transactions")
    transactions = []
    for where, record in records:
        if not isinstance(record, dict):
            raise UserError(f"--file {path}: {where} must be a JSON object with the transaction fields")
        try:
            tx = TransactionRequest.model_validate(record)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or 'transaction'}: {error['msg']}" for error in exc.errors()
            )
            raise UserError(f"--file {path}: {where}: {problems}") from None
        transactions.append(request_fields(tx.model_dump()))
    return transactions


def request_fields(record: dict) -> dict:
    """The wire fields of a transaction (ISO-8601 timestamp, UTC)."""

    out = {name: record[name] for name in REQUEST_FIELDS}
    when = out[TX_DATETIME]
    out[TX_DATETIME] = when.isoformat() if isinstance(when, datetime) else str(when)
    out[TX_AMOUNT] = float(out[TX_AMOUNT])
    return out


#: `fraud score --sample` draws from this many most recent days of the raw data.
SAMPLE_RECENT_DAYS = 7


def sample_raw_transactions(layout: DataLayout, n: int, seed: int = 0) -> list[dict]:
    """`n` transactions drawn at random from the last `SAMPLE_RECENT_DAYS` days of the simulated raw
    data (the period the online store's snapshots describe); each also carries its `tx_fraud` label."""

    if n < 1:
        raise UserError(f"--sample must be >= 1, got {n}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    # one folder per day (day=YYYY-MM-DD), so the lexical order is the date order
    files = (
        sorted(layout.transactions.glob("**/*.parquet"))[-SAMPLE_RECENT_DAYS:] if layout.transactions.is_dir() else []
    )
    if not files:
        raise UserError(
            f"no simulated transactions under {layout.transactions}: run `fraud simulate` first or pass --file"
        )
    connection = duckdb.connect()
    try:
        frame = connection.execute(
            "SELECT transaction_id, customer_id, terminal_id, tx_amount, tx_datetime, tx_fraud "  # noqa: S608 - only int() sample size and seed formatted in; the file list is bound
            f"FROM read_parquet(?, hive_partitioning = false) USING SAMPLE reservoir({int(n)} ROWS) "
            f"REPEATABLE ({int(seed)})",
            [[str(f) for f in files]],
        ).fetch_df()
    finally:
        connection.close()
    frame = frame.sort_values("tx_datetime", kind="stable")
    rows = []
    for record in frame.to_dict("records"):
        row = request_fields({**record, "tx_datetime": record["tx_datetime"].to_pydatetime()})
        row["tx_fraud"] = int(record["tx_fraud"])
        rows.append(row)
    return rows


def card_testing_burst(layout: DataLayout, seed: int = 0, n_small: int = 7) -> list[dict]:
    """A card-testing burst (the simulator's scenario 4: `n_small` small purchases at several
    terminals, CARD_TESTING_GAP_SECONDS apart, then a large one) of one card drawn from the recent
    simulated data, starting ten minutes after that card's drawn transaction; labelled fraud."""
    from datetime import datetime, timedelta

    import numpy as np

    from fraud.simulator import CARD_TESTING_GAP_SECONDS, CARD_TESTING_LARGE_AMOUNT, CARD_TESTING_SMALL_AMOUNT

    if n_small < 1:
        raise UserError(f"--card-testing must be >= 1, got {n_small}")
    anchor, *others = sample_raw_transactions(layout, 4, seed)
    terminals = [anchor["terminal_id"], *dict.fromkeys(o["terminal_id"] for o in others)]
    rng = np.random.default_rng(seed)
    when = datetime.fromisoformat(anchor["tx_datetime"].replace("Z", "+00:00")) + timedelta(minutes=10)
    amounts = [*rng.uniform(*CARD_TESTING_SMALL_AMOUNT, size=n_small), rng.uniform(*CARD_TESTING_LARGE_AMOUNT)]
    burst = []
    for i, amount in enumerate(amounts):
        row = request_fields(
            {
                "transaction_id": f"CT{seed:04d}{i:03d}-{anchor['transaction_id']}",
                "customer_id": anchor["customer_id"],
                "terminal_id": terminals[i % len(terminals)],
                "tx_amount": round(float(amount), 2),
                "tx_datetime": when.replace(tzinfo=None),
            }
        )
        row["tx_fraud"] = 1
        burst.append(row)
        when += timedelta(seconds=int(rng.integers(CARD_TESTING_GAP_SECONDS[0], CARD_TESTING_GAP_SECONDS[1] + 1)))
    return burst


def v1_request(transactions: list[dict]) -> dict:

    return {"instances": [{name: tx[name] for name in REQUEST_FIELDS} for tx in transactions]}


def v2_request(transactions: list[dict]) -> dict:

    n = len(transactions)
    return {
        "inputs": [
            {
                "name": name,
                "datatype": "FP64" if name == TX_AMOUNT else "BYTES",
                "shape": [n],
                "data": [tx[name] for tx in transactions],
            }
            for name in REQUEST_FIELDS
        ]
    }


def _reason_names(codes: list) -> list[str]:
    return [str(code.get("feature", code)) if isinstance(code, dict) else str(code) for code in codes]


def parse_v1_response(body: dict) -> list[ScoredTransaction]:
    return [
        ScoredTransaction(
            transaction_id=str(p["transaction_id"]),
            fraud_probability=float(p["fraud_probability"]),
            decision=str(p["decision"]),
            reasons=_reason_names(p.get("reason_codes", [])),
            model_version=str(p.get("model_version", "")),
            features_missing=bool(p.get("features_missing", False)),
            features_stale=bool(p.get("features_stale", False)),
        )
        for p in body["predictions"]
    ]


def parse_v2_response(body: dict) -> list[ScoredTransaction]:

    outputs = {o["name"]: o["data"] for o in body["outputs"]}
    n = len(outputs["transaction_id"])

    def column(name, default):
        return outputs.get(name, [default] * n)

    return [
        ScoredTransaction(
            transaction_id=str(outputs["transaction_id"][i]),
            fraud_probability=float(outputs["fraud_probability"][i]),
            decision=str(outputs["decision"][i]),
            reasons=_reason_names(json.loads(column("reason_codes", "[]")[i])),
            model_version=str(column("model_version", "")[i]),
            features_missing=bool(column("features_missing", False)[i]),
            features_stale=bool(column("features_stale", False)[i]),
        )
        for i in range(n)
    ]


def score_transactions(
    url: str,
    transactions: list[dict],
    protocol: str = "v1",
    model_name: str = MODEL_NAME,
    timeout_s: float = 30.0,
    token: str | None = None,
) -> list[ScoredTransaction]:
    """Send transactions through the stack (the transformer) and return the decisions; UserError on failure."""
    if protocol not in ("v1", "v2"):
        raise UserError(f"--protocol must be v1 or v2, got {protocol!r}")
    base = url.rstrip("/")
    if protocol == "v1":
        endpoint, body = f"{base}/v1/models/{model_name}:predict", v1_request(transactions)
    else:
        endpoint, body = f"{base}/v2/models/{model_name}/infer", v2_request(transactions)
    try:
        headers = {"authorization": f"Bearer {token}"} if token else None
        response = httpx.post(endpoint, json=body, timeout=timeout_s, headers=headers)
    except httpx.InvalidURL as exc:
        raise UserError(f"--url {url!r} is not a valid URL: {exc}") from None
    except httpx.TimeoutException:
        raise UserError(f"the scoring service at {url} did not answer within {timeout_s:g}s") from None
    except httpx.TransportError as exc:
        raise UserError(
            f"cannot reach the scoring service at {url} ({type(exc).__name__}): "
            "is it running? start it with `fraud serve`"
        ) from None
    if response.status_code != 200:
        try:
            detail = response.json().get("error", response.text)
        except ValueError:
            detail = response.text
        raise UserError(f"the scoring service answered {response.status_code}: {str(detail)[:500]}")
    try:
        payload = response.json()
        return parse_v1_response(payload) if protocol == "v1" else parse_v2_response(payload)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise UserError(f"the service at {url} returned an unexpected answer ({type(exc).__name__}: {exc})") from None
