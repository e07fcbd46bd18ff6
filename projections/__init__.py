"""Read models projected from the log into Postgres.

``rows`` maps records to rows (pure), ``store`` writes them, ``postgres`` is the consumer.
"""
