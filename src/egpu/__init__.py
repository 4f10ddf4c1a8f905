"""egpu: use a GPU that lives outside your machine's OS, through a Linux VM."""

__version__ = "0.1.0"
