"""The Python handler: ``python:package.module:function``, async or plain."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from rolebus.errors import ConfigError
from rolebus.handlers.base import HandlerContext, outcome_from_json
from rolebus.wire.messages import Outcome, Task

__all__ = ["PythonHandler", "import_callable"]


def import_callable(spec: str) -> Callable[..., Any]:
    _, module_name, function_name = spec.split(":")
    # Like uvicorn and celery: handler modules are found from where you run.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"handler {spec!r}: cannot import {module_name!r}: {error}",
            hint="check the module path, and run from the folder it is importable from",
        ) from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(
            f"handler {spec!r}: {module_name} has no function {function_name!r}",
            hint="name an async function (task, context) -> Outcome",
        )
    return function  # type: ignore[no-any-return]


class PythonHandler:
    """Calls ``function(task, context)``; awaits it when it is async."""

    def __init__(self, function: Callable[..., Any], name: str) -> None:
        self.function = function
        self.name = name

    async def __call__(self, task: Task, context: HandlerContext) -> Outcome:
        answer = self.function(task, context)
        if inspect.isawaitable(answer):
            answer = await answer
        if isinstance(answer, Outcome):
            return answer
        return outcome_from_json(answer, source=self.name)
