"""Feast entities: the card (customer) and the merchant terminal. Join keys are the raw id columns
(strings, see fraud.schema); the entity names come from fraud.features.definitions."""

from feast import Entity, ValueType

from fraud.features.definitions import CUSTOMER_ENTITY, TERMINAL_ENTITY
from fraud.schema import CUSTOMER_ID, TERMINAL_ID

customer = Entity(
    name=CUSTOMER_ENTITY,
    join_keys=[CUSTOMER_ID],
    value_type=ValueType.STRING,
    description="A payment card (the simulator's customer).",
)

terminal = Entity(
    name=TERMINAL_ENTITY,
    join_keys=[TERMINAL_ID],
    value_type=ValueType.STRING,
    description="A merchant payment terminal.",
)
