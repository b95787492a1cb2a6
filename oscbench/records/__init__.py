"""What a run leaves on disk and how it is found again: its record (`results.json`) and W&B
mirror, its identity, its checkpoint, and the locks that keep a run from training twice."""
