"""Real-time velocity features over Redis Streams.

* `events`: the transaction event, its wire form, the stream settings and the publisher (the
  predictor and the authorisation flow XADD every transaction, MAXLEN ~);
* `windows`: one entity's recent events and how an event is applied (idempotent per
  transaction id, out-of-order events sorted in, late events rejected);
* `state`: the window states in the Feast online store (push API) and the request-time
  evaluation of the velocity features from them;
* `aggregator`: the consumer-group process that keeps the states current (docs/features.md).
"""
