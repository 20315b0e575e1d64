"""A role worker: the loop (``loop``), what it does with each message
(``dispatch``), how a delivery ends (``settle``), outcomes that wait for someone
(``parking``), the drain loop (``slots``), escalation timers (``supervisor``) and
running a team of workers (``runner``).
"""
