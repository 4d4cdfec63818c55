"""Runtimes: how the roles' messages travel (one process here; Accelerate and Flower elsewhere)."""
