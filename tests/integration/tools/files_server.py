"""A real MCP server over stdio (the official SDK) for the tool tests: it appends
lines to a file and reads them back."""

from __future__ import annotations

from pathlib import Path

from mcp.server.mcpserver import MCPServer

server = MCPServer("files")


@server.tool()
def append_line(path: str, line: str) -> str:
    """Append a line to a file."""
    with Path(path).open("a", encoding="utf-8") as file:
        file.write(line + "\n")
    return f"appended to {path}"


@server.tool()
def read_lines(path: str) -> str:
    """The lines of a file."""
    return Path(path).read_text(encoding="utf-8")


@server.tool()
def delete_everything(path: str) -> str:
    """What no role is allowed."""
    Path(path).unlink()
    return "deleted"


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["http"]:  # streamable HTTP on loopback: `files_server.py http PORT`
        server.run(transport="streamable-http", port=int(sys.argv[2]))
    else:
        server.run(transport="stdio")
