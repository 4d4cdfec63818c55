"""One data owner: trains the shared LoRA adapter on its own data with transformers' Trainer loop."""

from fedsrd.integrations.flower import make_client_app

app = make_client_app()
