"""The ground floor: errors, registries, plugins, crash-safe file IO, collectives, the version and the
run directory. Nothing here imports from the rest of gapkd."""
