"""The `papscan` command line (`main.app`), its command groups and console helpers."""
