"""fedsrd on Flower with hostile SuperNodes (tests only)."""
