"""Reading runs: their events (metrics.jsonl) -> diagnosis and curves -> report tables and report.html."""
