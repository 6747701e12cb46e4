"""The results database: tables, sessions and migrations, queries, scan jobs, exports."""
