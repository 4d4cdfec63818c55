"""fedsrd on Flower: the ServerApp and ClientApp are `fedsrd.integrations.flower`'s."""
