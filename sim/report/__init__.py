"""Self-contained HTML reports of runs: plots inlined as PNG, no server, no CDN."""
