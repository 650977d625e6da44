"""What a run keeps and resumes from: the checkpoint file, the checkpointer, resume reconciling,
RNG state."""
