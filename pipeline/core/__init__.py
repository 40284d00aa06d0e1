"""Infrastructure every stage shares: the config schema, the run directory and its manifest,
artifact schemas, content hashes, the pipeline lock, the stage table and the runner it drives."""
