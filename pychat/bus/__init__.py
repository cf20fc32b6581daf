"""The send log and what travels on it, shared by one node and many (docs/scale-out-plan.md)."""
