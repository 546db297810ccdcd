"""The machinery."""
