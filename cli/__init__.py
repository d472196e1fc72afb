"""The `coe` command line (layer 3: it reaches every layer below)."""
