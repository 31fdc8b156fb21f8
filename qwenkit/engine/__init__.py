"""The batched engine: sequences, the block pool, the scheduler, the model runner."""
