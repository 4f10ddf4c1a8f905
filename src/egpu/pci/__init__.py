"""pci layer (see DESIGN.md)."""
