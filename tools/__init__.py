"""Command-line tools: cce-demo, cce-dump, cce-bench."""
