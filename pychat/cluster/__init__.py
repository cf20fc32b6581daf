"""Many nodes as one chat service (issue 13): Kafka for one writer per chat, Redis for delivery
between nodes, Cassandra for the messages. Nothing here runs in the single-node default."""
