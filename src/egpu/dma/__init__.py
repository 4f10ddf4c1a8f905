"""dma layer (see DESIGN.md)."""
