"""Data: prompt formats, reading XSUM-style sources, `prepare`, and the batch packer."""
