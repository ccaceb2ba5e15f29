"""The command line: parsing and dispatch (``cli``) and the commands' own I/O (``sample``, ``demo``)."""
