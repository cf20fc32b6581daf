"""Real backing services (Cassandra, ...) that the project installs, starts, waits for and stops by
itself, for development (`make cassandra`) and for the tests' fixtures."""
