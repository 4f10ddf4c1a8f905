"""guest layer (see DESIGN.md)."""
