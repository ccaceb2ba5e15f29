"""Image data: folders and standard datasets decoded into memory, with a checked cache."""
