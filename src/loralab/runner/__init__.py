"""Jobs and workers: claim and lease (queue), run and watch the engine child (supervisor), the loop (worker)."""
