"""Task and text data: counting tasks, reasoning tasks, VQA items, text corpora. No model code."""
