"""What flows between roles, and the records that make each step happen once.

Effects (the outbox), task state, handoffs and contracts, escalations, dead letters.
"""
