"""Small shared helpers (image grids and files)."""
