"""Handlers: the port (:mod:`~rolebus.handlers.base`) and its kinds.

User code imports ``Handler`` and ``HandlerContext`` from here.
"""

from rolebus.handlers.base import Handler, HandlerContext

__all__ = ["Handler", "HandlerContext"]
