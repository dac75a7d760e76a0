"""Use cases shared by the API, the UI and the CLI: datasets, jobs, the model registry, generation, system info."""
