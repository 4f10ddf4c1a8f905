"""images layer (see DESIGN.md)."""
