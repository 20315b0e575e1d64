"""A command handler for tests: behaves as the task's payload["mode"] says."""

import json
import sys
import time

request = json.load(sys.stdin)
mode = request["task"]["payload"].get("mode", "ok")
if mode == "exit1":
    print("the model API returned 500", file=sys.stderr)
    sys.exit(1)
if mode == "nonjson":
    print("Sure! Here is what I did: ...")
    sys.exit(0)
if mode == "hang":
    time.sleep(60)
if mode == "badoutcome":
    print(json.dumps({"status": "finished"}))
    sys.exit(0)
print(
    json.dumps(
        {
            "status": "completed",
            "result": {
                "role": request["role"]["id"],
                "attempt": request["context"]["attempt"],
                "persona_seen": "persona" in request["role"],
            },
            "tasks": [{"subject": "task.frontend.build", "title": "follow-up from a command"}],
        }
    )
)
