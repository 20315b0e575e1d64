"""A command handler for tests: a long agent that works through a child process.

On its first attempt it starts a child (as coding agents do: a shell, a compiler)
that works for ``seconds``; later attempts answer at once. Both write their pids to
``<dir>/parent-<attempt>`` and ``<dir>/child-<attempt>``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

request = json.load(sys.stdin)
attempt = request["context"]["attempt"]
folder = Path(request["task"]["payload"]["dir"])
folder.mkdir(parents=True, exist_ok=True)
seconds = request["task"]["payload"]["seconds"] if attempt == 1 else 0
child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
(folder / f"child-{attempt}").write_text(str(child.pid))
(folder / f"parent-{attempt}").write_text(str(os.getpid()))
child.wait()
print(json.dumps({"status": "completed", "result": {"attempt": attempt}}))
