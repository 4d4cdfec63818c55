"""The coordinator: fedsrd's own ServerApp, unchanged."""

from fedsrd.integrations.flower import make_server_app

app = make_server_app()
