"""The team: role files (``roles/*.md``) as RoleSpecs, and the NATS permissions they imply."""
