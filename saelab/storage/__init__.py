"""Storage safety: atomic file writes and checked reads (`files`), one writer per output
directory (`lock`)."""
