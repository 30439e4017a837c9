"""`make bench`: start the real stack (gateway, websockify, QEMU under the local driver, Postgres, Redis) on
a database and Redis db of its own, measure what issue 7 asks for, print a table and write JSON under
bench/results/. What each figure means and how it is taken: docs/BENCHMARKS.md."""
