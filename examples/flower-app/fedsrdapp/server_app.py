"""The coordinator: samples clients, aggregates their encoded updates, checkpoints every round."""

from fedsrd.integrations.flower import make_server_app

app = make_server_app()
