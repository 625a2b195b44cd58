"""The typed config: its schema, loading and checks, the shipped presets and the key reference. Imports no torch."""
