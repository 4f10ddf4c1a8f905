"""vfio_user layer (see DESIGN.md)."""
