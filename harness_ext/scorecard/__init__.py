"""``needles scorecard``: one model (local or behind an endpoint) scored on every family at a length ladder."""
