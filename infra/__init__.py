"""Local infrastructure: a real Kafka broker and PostgreSQL server owned by the project."""
