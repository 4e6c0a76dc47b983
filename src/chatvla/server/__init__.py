"""The serving core: settings, validation, batching pipeline, sessions, auth, metrics, transports.

Entry points: `chatvla.server.app.ServerApp` (embed a server) and `chatvla serve` (the CLI).
"""
