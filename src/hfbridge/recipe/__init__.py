"""The run recipe: one config, one pipeline, small task objects (see docs/architecture.md)."""
