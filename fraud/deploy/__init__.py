"""Rolling model versions out to serving: KServe canaries, local canaries, promotion and rollback."""
