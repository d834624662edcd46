"""UltraClean jobs: the command-line entry points and the machinery they share (config, versions, Ray)."""
