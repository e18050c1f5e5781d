"""What every stage shares: atomic checkpoint files, YAML reading, processes and devices, RNG state,
logging and metrics files. Imports neither `distill` nor `transfer` (they both import it)."""
