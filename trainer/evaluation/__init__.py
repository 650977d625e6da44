"""What judges and ships an encoder: evaluation, embedding, export, loading an encoder, the online
probe."""
