"""The core: environment, GPU helpers and planners, profiles, model registry and loading, architecture accessors,
data and tasks, hooks, capture, evaluation, manifest, cache, figure style. Imports nothing above it."""
