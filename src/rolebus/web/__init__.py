"""The web dashboard: the app (routes) and its server-rendered pages."""
