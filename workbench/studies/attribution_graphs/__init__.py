"""Attribution graphs on our own transcoders: IOI and counting prompts, validated against the model (notebook 08)."""
