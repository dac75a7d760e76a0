"""HTTP API: FastAPI app, routers for datasets, training, models and generation, live event streams."""
