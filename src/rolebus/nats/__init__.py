"""Everything that talks to NATS: the only package that imports ``nats``.

``protocol`` holds the pure facts (ack metadata, pub-acks, status and error codes);
``connection`` composes the I/O parts: ``publish``, ``kv``, ``streams``, ``admin``,
``puller`` (the one pull loop), ``groupcommit``; ``server`` runs the embedded
nats-server.
"""
