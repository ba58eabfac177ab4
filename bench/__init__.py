"""Side-by-side benchmarks; each script writes bench/out/<name>.json and <name>.md."""
