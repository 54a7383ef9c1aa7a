"""Sub-commands that live in a module of their own; each registers itself on the typer app."""
