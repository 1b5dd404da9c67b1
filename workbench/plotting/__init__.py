"""The paper theme and the figure helpers that methods, explorers and studies share: frames in, figures out."""
