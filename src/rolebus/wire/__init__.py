"""The wire contract: typed messages, their msgpack codec, subjects, headers, trace context.

What another language needs to speak to rolebus is here (and in subjects.md).
"""
