"""An MCP server over stdio (the official SDK's MCPServer) that serves the files of a
sample repository: list them, read one, append a note. Run by the backend engineer's
worker for each tool call (see roles/eng-be.md)."""

from __future__ import annotations

from pathlib import Path

from mcp.server.mcpserver import MCPServer

REPO = Path(__file__).resolve().parent / "sample-repo"
server = MCPServer("sample-repo")


def _inside(path: str) -> Path:
    """A path in the repository, never outside it (the model chooses the path)."""
    resolved = (REPO / path).resolve()
    if REPO not in (resolved, *resolved.parents):
        raise ValueError(f"{path!r} is outside the repository")
    return resolved


@server.tool()
def list_files() -> str:
    """The repository's files, one per line."""
    return "\n".join(str(p.relative_to(REPO)) for p in sorted(REPO.rglob("*")) if p.is_file())


@server.tool()
def read_file(path: str) -> str:
    """One file of the repository."""
    return _inside(path).read_text(encoding="utf-8")


@server.tool()
def append_note(text: str) -> str:
    """Append a line to NOTES.md (a change: it runs once per task)."""
    with _inside("NOTES.md").open("a", encoding="utf-8") as notes:
        notes.write(f"- {text}\n")
    return "noted"


if __name__ == "__main__":
    server.run(transport="stdio")
