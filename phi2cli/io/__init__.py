"""Files: atomic writes and the merged-model export."""
