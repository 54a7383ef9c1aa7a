"""`sipsniff-acc audit`: the wire's acc records against a billing database's rows.

wire.py accounts a capture in memory (as `process` does, nothing written); billing.py reads
the billing side (SQL through SQLAlchemy, or a CSV export); pairing.py pairs the two (pure)
and names every difference; report.py writes the summary and JSON lines; html.py the
self-contained HTML report.
"""
