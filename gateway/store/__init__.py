"""The store: Postgres, the source of truth. Small query functions that take a cursor first and raise
domain errors (gateway.errors), and the numbered migrations. Imports nothing above it (engine, web, cli)."""
