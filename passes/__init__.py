"""FX graph passes of the sparsedrop backend, one file per pattern family."""
