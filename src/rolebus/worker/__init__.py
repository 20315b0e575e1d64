"""A role worker: the loop (``loop``), what it does with each message
(``dispatch``: decode, read the record, step the lifecycle), what a handler's answer
becomes (``answers``), carrying out a step's actions (``executor``), the drain loop
(``slots``), escalation timers (``supervisor``) and running a team of workers
(``runner``). The rules themselves are :mod:`rolebus.flows.lifecycle`.
"""
