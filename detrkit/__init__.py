"""detrkit: DETR, faithful and fast."""
