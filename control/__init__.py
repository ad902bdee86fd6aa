"""Control plane: QMP-compatible server and client, logging setup and the migctl CLI."""
