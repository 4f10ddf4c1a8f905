"""vm layer (see DESIGN.md)."""
