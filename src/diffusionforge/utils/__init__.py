"""Small shared helpers: image grids and files, atomic writes, lazy package attributes, config type checks."""
