"""The reference decoder (`llama`) and how it is parallelised (`parallelize`)."""
