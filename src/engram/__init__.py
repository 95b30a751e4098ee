"""engram: a graph database for long-lived memory graphs whose backups cannot be silently broken."""

__version__ = "0.1.0"
